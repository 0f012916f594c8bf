//! The CUDA side: finding the driver and NVRTC, compiling kernels, caching cubins, launching on the
//! caller's stream and capturing graphs.

pub mod buffer;
pub mod cache;
pub mod device;
pub mod graph;
pub mod jit;
pub mod libs;
pub mod sources;

pub use device::{Device, DeviceInfo, Kernel};
pub use graph::Graph;
