//! Graph passes: each takes a graph (and what must be kept) and returns a
//! schedule or a plan; none changes the values a graph computes.

mod dce;
mod inplace;
mod memory;

pub use dce::live_schedule;
pub use inplace::place_in_place;
pub use memory::{plan_memory, MemoryPlan};
