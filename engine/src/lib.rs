//! graft-engine: tensors, storage, compiling graphs into plans, and running
//! plans on a backend: the CPU, or an NVIDIA GPU (feature `cuda`).
//!
//! A research prototype links this crate, records a graph with
//! [`graft_ir::Graph`], marks what it trains, compiles and runs:
//!
//! ```
//! use graft_engine::{compile_training, CpuExecutor, Feeds, Tensor};
//! use graft_engine::ir::{DType, Graph};
//!
//! // loss = cross_entropy(x·Wᵀ, labels) with W trainable.
//! let mut g = Graph::new();
//! let x = g.input("x", &[2, 3], DType::F32);
//! let labels = g.input("labels", &[2], DType::I32);
//! let w = g.param("w", &[4, 3], DType::F32, true);
//! let logits = g.linear(x, w, None).unwrap();
//! let loss = g.cross_entropy(logits, labels).unwrap();
//!
//! let plan = compile_training(g, loss, &[logits]).unwrap();
//! let (xt, lt) = (
//!     Tensor::from_f32(&[2, 3], &[1.0, 0.0, 2.0, -1.0, 0.5, 0.0]).unwrap(),
//!     Tensor::from_i32(&[2], &[3, 1]).unwrap(),
//! );
//! let wt = Tensor::from_f32(&[4, 3], &[0.1; 12]).unwrap();
//! let mut feeds = Feeds::new();
//! feeds.bind(x, &xt).bind(labels, &lt).bind(w, &wt);
//!
//! let out = CpuExecutor::new().run(&plan, &feeds).unwrap();
//! let (loss_value, dw) = (&out[0], &out[2]); // [loss, logits, grad of w]
//! assert!((loss_value.as_f32().unwrap()[0] - 4f32.ln()).abs() < 1e-6);
//! assert_eq!(dw.shape(), &[4, 3]);
//! assert_eq!(plan.grad_of(w), Some(plan.outputs()[2]));
//! ```

pub mod alloc;
pub mod chain;
mod device;
mod executor;
#[cfg(feature = "cuda")]
mod gpu;
mod nf4;
pub mod optim;
mod plan;
mod profile;
pub mod rng;
mod tensor;

pub use device::{host_available_bytes, Device, Executor};
pub use executor::{CpuExecutor, Feeds};
#[cfg(feature = "cuda")]
pub use gpu::{device_bytes_needed, gpu_unsupported, DeviceAdamW, GpuExecutor, RunPhases};
pub use graft_ir as ir;
pub use graft_kernels as kernels;
pub use plan::{
    adalomo_state_shapes, compile, compile_fused, compile_fused_with, compile_training,
    compile_training_with, compile_with, CompileOptions, FusedInputs, FusedRule, Plan,
};
pub use profile::{OpProfile, OpTime};
pub use tensor::{Storage, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Ir(#[from] graft_ir::IrError),
    #[error("compile: {0}")]
    Compile(String),
    #[error("tensor: {0}")]
    Tensor(String),
    #[error("`{0}` is read by the plan but was not bound")]
    Unbound(String),
    #[error("`{name}` was bound to a {got} tensor but the graph declares {want}")]
    Feed {
        name: String,
        want: String,
        got: String,
    },
    #[error("{op}: {msg}")]
    Kernel { op: &'static str, msg: String },
    #[error("GPU: {0}")]
    Gpu(String),
    #[error("memory: {0}")]
    Memory(String),
}
