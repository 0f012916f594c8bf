//! The CUDA side: finding the driver and NVRTC, compiling kernels, caching cubins, launching on the
//! caller's stream and capturing graphs.

pub mod buffer;
pub mod cache;
pub mod device;
pub mod graph;
pub mod jit;
pub mod libs;
pub mod name;
pub mod sources;
pub mod tensor_map;

pub use device::{Device, DeviceInfo, Kernel};
pub use graph::Graph;
pub use tensor_map::{Bf16Tiled5d, TensorMap};

/// The argument array of a kernel launch, from mutable locals that outlive the launch call:
/// `let mut args = kernel_args![x, stride, n];` then `device.launch(.., &mut args)`.
#[macro_export]
macro_rules! kernel_args {
    ($($v:ident),* $(,)?) => {
        [$(&mut $v as *mut _ as *mut ::std::ffi::c_void),*]
    };
}
