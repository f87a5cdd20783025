//! One module per subcommand.

pub mod logits;
pub mod quantize;

/// A subcommand's failure: one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Model(#[from] graft_models::ModelError),
    #[error(transparent)]
    Engine(#[from] graft_engine::EngineError),
    #[error("{0}")]
    Usage(String),
}
