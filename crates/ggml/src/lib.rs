//! `ggml-ane`: a ggml backend (API v3) that runs llama.cpp's prefill MUL_MATs on the Apple Neural
//! Engine.
//!
//! llama.cpp loads this library (`GGML_BACKEND_PATH=/path/libggml_ane.so` or `ggml_backend_load`) and
//! sees one device, `ANE`, of type ACCEL. Like ggml-blas it works on host memory (the CPU buffer
//! type), claims only MUL_MATs it will compute (see [`support`]), and computes each one through an
//! engine ([`ane_engine`]): the ANE on a Mac, or the CPU reference engine when
//! `GGML_ANE_ENGINE=reference`. Whatever happens in the engine, the output is written: failures fall
//! back to the plugin's own CPU path.
//!
//! Rooms, top-down along a MUL_MAT node's path: [`boundary`] (the C ABI, the only raw-pointer
//! layer) -> [`claim`] (supports_op's decision, then what it stages) -> [`compute`] (graph splits
//! into groups) -> [`matmul`] (dispatch, host conversion, staging, fallback) -> the engine
//! ([`open`] chooses it). [`device`] holds the state they share. See `README.md` beside this file.

#![deny(unsafe_op_in_unsafe_fn)]
#![recursion_limit = "256"]

mod baked;
mod boundary;
mod bridge;
mod claim;
mod compute;
pub mod config;
mod device;
pub mod ffi;
pub mod ggml;
pub mod guard;
pub mod health;
pub mod host_api;
pub mod host_cpu;
pub mod host_gpu;
mod lookahead;
pub mod matmul;
mod mul_mat_id;
mod open;
pub mod placement;
pub mod split;
pub mod stats;
pub mod support;
/// Test devices and data for the compute paths (the unit tests and `tests/`); not plugin API.
#[doc(hidden)]
pub mod test_util;
pub mod view;

pub use boundary::{ggml_backend_init, ggml_backend_score};
pub use device::DeviceState;
