//! One module per subcommand.

pub mod eval;
pub mod generate;
pub mod logits;
pub mod make_default;
pub mod merge;
pub mod plan;
pub mod quantize;
pub mod run;

/// A subcommand's failure: one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Model(#[from] graft_models::ModelError),
    #[error(transparent)]
    Engine(#[from] graft_engine::EngineError),
    #[error(transparent)]
    Config(#[from] graft_trainer::config::ConfigError),
    #[error(transparent)]
    Data(#[from] graft_trainer::data::DataError),
    #[error(transparent)]
    Run(#[from] graft_trainer::run::RunError),
    #[error("{0}")]
    Usage(String),
}
