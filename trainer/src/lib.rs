//! graft-trainer: what the `trainer` binary is made of, as a library so each
//! piece is tested on its own.

pub mod config;
pub mod data;
pub mod embedded;
pub mod generate;
pub mod run;
pub mod schedule;
pub mod synthetic;
