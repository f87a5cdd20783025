//! Graph passes: each takes a graph (and what must be kept) and returns a
//! schedule or a plan, or rewrites the graph (fusion) into one that
//! computes the same values (up to rounding: a fused sum rounds once).

mod chains;
mod dce;
mod fuse;
mod inplace;
mod linear_loss;
mod loss_cast;
mod memory;
mod recompute;

pub use chains::fuse_elementwise;
pub use dce::live_schedule;
pub use fuse::{fuse_products, Fusion};
pub use inplace::place_in_place;
pub use linear_loss::{fuse_linear_loss, CHUNK_BYTES};
pub use loss_cast::elide_loss_casts;
pub use memory::{plan_memory, MemoryPlan};
pub use recompute::{recompute, Recompute};
