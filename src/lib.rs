//! sparkinfer: CUDA kernels for Mixture-of-Experts LLM decoding on edge Blackwell GPUs.
//!
//! The crate builds `libsparkinfer.so` with a C ABI (`include/sparkinfer/sparkinfer.h`, generated from
//! [`capi`]). Kernels are CUDA C++ sources embedded in the library and compiled by NVRTC at run time for
//! the exact architecture of the device; they launch on the caller's stream and never synchronise or
//! allocate. A CPU backend built on [`reference`] serves the same calls with host pointers.
//!
//! Data flows one way: [`capi`] (argument checks, status codes) → [`ops`] (shapes, specialisation) →
//! [`runtime`] (modules, launches, graphs) or [`reference`] (CPU).

#![allow(clippy::too_many_arguments)]

pub mod bench;
pub mod capi;
pub mod checks;
pub mod error;
pub mod ops;
pub mod reference;
pub mod runtime;
pub mod testing;

pub use error::{Error, Result, Status};
pub use ops::Context;

/// Library version, as in `Cargo.toml`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// ABI version: the soname's suffix. Bumped on every incompatible change of the C surface.
pub const ABI_VERSION: u32 = 0;
