//! graft-ir: Graft's graph IR.
//!
//! A [`Graph`] records ops on values with shapes and dtypes; [`backward`]
//! appends the reverse-mode gradient graph toward trainable parameters only;
//! [`passes`] turn a graph into a schedule and a memory plan. This crate knows
//! nothing of storage, kernels or files.

pub mod autograd;
pub mod dtype;
pub mod graph;
pub mod op;
pub mod passes;
pub mod program;

pub use autograd::{backward, Gradients};
pub use dtype::{DType, Nf4Layout, NF4_NESTED_BLOCK};
pub use graph::{Graph, Node, NodeId, Source, Value, ValueId};
pub use op::{Activation, AdaLomoSpec, AttentionSpec, Epilogue, Op, Product, RopeSpec, TypeInfo};
pub use program::{Instr, Operand, Program};

#[derive(Debug, thiserror::Error)]
pub enum IrError {
    #[error("{op}: {msg}")]
    Shape { op: &'static str, msg: String },
    #[error("value %{} does not exist in this graph", .0 .0)]
    UnknownValue(ValueId),
    #[error("value %{} is not a parameter", .0 .0)]
    NotAParam(ValueId),
    #[error("autograd: {0}")]
    Autograd(String),
}
