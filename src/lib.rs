//! Graft: a tensor engine and compiler for training adapters on large
//! language models. This facade re-exports the layers; most users want
//! [`engine`] (graphs, plans, execution) and [`models`] (HF checkpoints,
//! adapters).

pub use graft_engine as engine;
pub use graft_ir as ir;
pub use graft_kernels as kernels;
pub use graft_models as models;
