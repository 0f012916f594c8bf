//! One module per kernel family: typed parameters, validation, choice of specialisation, dispatch to
//! the GPU (`runtime`) or the CPU (`reference`).
//!
//! Addresses are plain integers here: device addresses on a CUDA context, host addresses on the CPU
//! backend. Every op validates its shapes, strides, alignment and buffer extents before launching.

pub mod attention;
pub mod gemv;
pub mod moe;
pub mod rmsnorm;
mod tensor;

use crate::error::{Error, Result};
use crate::runtime::{sources::KernelSource, Device};
use cudarc::driver::sys::CUstream;

pub use tensor::{Matrix, MatrixMut};

/// A borrowed CUDA stream (`cudaStream_t`), or NULL for the legacy stream and the CPU backend.
#[derive(Clone, Copy, Debug)]
pub struct Stream(CUstream);

impl Stream {
    pub const NULL: Stream = Stream(std::ptr::null_mut());

    /// # Safety
    /// `stream` must be NULL or a valid stream of the context it is used with, alive while it is used.
    pub unsafe fn from_raw(stream: CUstream) -> Stream {
        Stream(stream)
    }

    pub fn raw(self) -> CUstream {
        self.0
    }

    pub fn is_null(self) -> bool {
        self.0.is_null()
    }

    /// Waits for the stream's work on a CUDA context; nothing to wait for on the CPU backend.
    pub fn synchronize(self, ctx: &Context) -> Result<()> {
        match ctx.backend() {
            Backend::Cpu => ctx.check_stream(self),
            Backend::Cuda(d) => unsafe { d.stream_synchronize(self.0) },
        }
    }
}

/// Where a context runs its ops.
pub enum Backend {
    /// The CPU reference implementation over host pointers; streams must be NULL.
    Cpu,
    Cuda(Device),
}

/// A device (or the CPU) with the kernels compiled for it. Usable from several threads at once.
pub struct Context {
    backend: Backend,
}

/// Device ordinal that selects the CPU backend.
pub const DEVICE_CPU: i32 = -1;

impl Context {
    /// A context on CUDA device `device`, or the CPU backend for [`DEVICE_CPU`].
    pub fn new(device: i32) -> Result<Context> {
        if device == DEVICE_CPU {
            return Ok(Context { backend: Backend::Cpu });
        }
        if device < 0 {
            return Err(Error::invalid(format!(
                "device: {device} is neither a CUDA device ordinal nor SPARKINFER_DEVICE_CPU (-1)"
            )));
        }
        Ok(Context { backend: Backend::Cuda(Device::new(device)?) })
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    pub fn is_cpu(&self) -> bool {
        matches!(self.backend, Backend::Cpu)
    }

    /// The CUDA device, or an error naming `what` for the CPU backend.
    pub fn device(&self, what: &str) -> Result<&Device> {
        match &self.backend {
            Backend::Cuda(d) => Ok(d),
            Backend::Cpu => Err(Error::unsupported(format!("{what} needs a CUDA context; this is the CPU backend"))),
        }
    }

    /// Checks the stream against the backend: the CPU backend runs synchronously and takes no stream.
    pub(crate) fn check_stream(&self, stream: Stream) -> Result<()> {
        if self.is_cpu() && !stream.is_null() {
            return Err(Error::invalid("stream: the CPU backend runs synchronously; pass a NULL stream"));
        }
        Ok(())
    }
}

/// Every kernel source with all the instantiations the library may launch (for `sparkinfer compile`).
pub fn all_kernel_sources() -> Vec<&'static KernelSource> {
    let mut sources: Vec<&'static KernelSource> = vec![&rmsnorm::SOURCE, &gemv::SOURCE];
    sources.extend(attention::kernel_sources());
    sources.extend(moe::kernel_sources());
    sources
}

/// Checks that a buffer pointer is non-NULL and aligned to `align` bytes.
pub(crate) fn check_ptr(name: &str, ptr: u64, align: u64) -> Result<()> {
    if ptr == 0 {
        return Err(Error::invalid(format!("{name}: NULL pointer")));
    }
    if !ptr.is_multiple_of(align) {
        return Err(Error::invalid(format!(
            "{name}: address {ptr:#x} is not aligned to {align} bytes, which the kernel's vector loads need"
        )));
    }
    Ok(())
}

/// A positive size that fits in an i32 (grid dimensions and kernel arguments).
pub(crate) fn check_dim(name: &str, value: i64, max: i64) -> Result<usize> {
    if value <= 0 {
        return Err(Error::invalid(format!("{name}: must be positive, got {value}")));
    }
    if value > max {
        return Err(Error::invalid(format!("{name}: {value} exceeds the largest supported value {max}")));
    }
    Ok(value as usize)
}

/// True when the byte ranges `[a, a + a_len)` and `[b, b + b_len)` overlap.
pub(crate) fn overlaps(a: u64, a_len: u64, b: u64, b_len: u64) -> bool {
    a < b.saturating_add(b_len) && b < a.saturating_add(a_len)
}

#[cfg(test)]
mod name_tests {
    use crate::runtime::name::KernelName;

    /// Every name an op formats at launch (its instantiation list holds the same names) fits the stack
    /// buffer, so no launch looks up a cut name.
    #[test]
    fn every_instantiation_name_fits_a_kernel_name() {
        for source in super::all_kernel_sources() {
            for name in (source.instantiations)() {
                assert!(KernelName::fits(format_args!("{name}")), "{}: {name}", source.name);
            }
        }
    }
}
