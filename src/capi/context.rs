//! Contexts, device information, memory and stream utilities, graphs.

use super::{guard, sparkinfer_status, write_out};
use crate::error::{Error, Result};
use crate::ops::{Backend, Context};
use crate::runtime::{self, Graph};
use std::ffi::{c_char, c_void};

/// The CUDA stream type: the same type as `cudaStream_t` and `CUstream`, so no CUDA header is needed.
/// (Declared in the header by hand: `typedef struct CUstream_st *sparkinfer_stream;`.)
pub type sparkinfer_stream = cudarc::driver::sys::CUstream;

/// Device number that selects the CPU reference backend (host pointers, NULL stream).
pub const SPARKINFER_DEVICE_CPU: i32 = -1;

/// A device (or the CPU backend) and the kernels compiled for it. Thread-safe: one context may be used
/// from several threads at once.
pub struct sparkinfer_context {
    inner: Context,
}

/// A captured, instantiated CUDA graph. Not thread-safe: launch a graph from one thread at a time.
pub struct sparkinfer_graph {
    inner: Graph,
}

/// Backend of a context.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum sparkinfer_backend {
    SPARKINFER_BACKEND_CPU = 0,
    SPARKINFER_BACKEND_CUDA = 1,
}

/// What sparkinfer_context_device_info reports. For the CPU backend only `backend` and `name` are set
/// and the numbers are zero.
#[repr(C)]
pub struct sparkinfer_device_info {
    pub backend: sparkinfer_backend,
    /// CUDA device ordinal; -1 for the CPU backend.
    pub ordinal: i32,
    /// NUL-terminated device name.
    pub name: [c_char; 256],
    pub compute_capability_major: i32,
    pub compute_capability_minor: i32,
    pub sm_count: i32,
    pub total_memory_bytes: u64,
    pub l2_cache_bytes: i32,
    /// Shared memory a block may use after opting in.
    pub max_shared_memory_per_block: i32,
}

pub(crate) fn context_ref<'a>(ctx: *const sparkinfer_context) -> Result<&'a Context> {
    if ctx.is_null() {
        return Err(Error::invalid("ctx: NULL context"));
    }
    Ok(unsafe { &(*ctx).inner })
}

/// Number of CUDA devices. Fails with CUDA_UNAVAILABLE when there is no usable driver.
#[no_mangle]
pub extern "C" fn sparkinfer_device_count(count: *mut i32) -> sparkinfer_status {
    guard(|| {
        if count.is_null() {
            return Err(Error::invalid("count: NULL output pointer"));
        }
        write_out("count", count, runtime::device::device_count()?)
    })
}

/// Creates a context on CUDA device `device` (its primary context, the one the CUDA runtime uses), or on
/// the CPU backend for `SPARKINFER_DEVICE_CPU`. Kernels are compiled on first use.
#[no_mangle]
pub extern "C" fn sparkinfer_context_create(device: i32, out: *mut *mut sparkinfer_context) -> sparkinfer_status {
    guard(|| {
        if out.is_null() {
            return Err(Error::invalid("out: NULL output pointer"));
        }
        unsafe { out.write(std::ptr::null_mut()) };
        let ctx = Box::new(sparkinfer_context { inner: Context::new(device)? });
        write_out("out", out, Box::into_raw(ctx))
    })
}

/// Destroys a context. NULL is ignored. Graphs captured in it must be destroyed first.
#[no_mangle]
pub extern "C" fn sparkinfer_context_destroy(ctx: *mut sparkinfer_context) {
    if ctx.is_null() {
        return;
    }
    let _ = guard(|| {
        drop(unsafe { Box::from_raw(ctx) });
        Ok(())
    });
}

/// Fills `info` with the context's device.
#[no_mangle]
pub extern "C" fn sparkinfer_context_device_info(
    ctx: *const sparkinfer_context,
    info: *mut sparkinfer_device_info,
) -> sparkinfer_status {
    guard(|| {
        let ctx = context_ref(ctx)?;
        if info.is_null() {
            return Err(Error::invalid("info: NULL output pointer"));
        }
        let mut out = sparkinfer_device_info {
            backend: sparkinfer_backend::SPARKINFER_BACKEND_CPU,
            ordinal: -1,
            name: [0; 256],
            compute_capability_major: 0,
            compute_capability_minor: 0,
            sm_count: 0,
            total_memory_bytes: 0,
            l2_cache_bytes: 0,
            max_shared_memory_per_block: 0,
        };
        let name = match ctx.backend() {
            Backend::Cpu => "CPU reference backend".to_string(),
            Backend::Cuda(d) => {
                let i = &d.info;
                out.backend = sparkinfer_backend::SPARKINFER_BACKEND_CUDA;
                out.ordinal = i.ordinal;
                out.compute_capability_major = i.cc_major;
                out.compute_capability_minor = i.cc_minor;
                out.sm_count = i.sm_count;
                out.total_memory_bytes = i.total_memory;
                out.l2_cache_bytes = i.l2_bytes;
                out.max_shared_memory_per_block = i.max_shared_per_block_optin;
                i.name.clone()
            }
        };
        for (dst, &b) in out.name.iter_mut().zip(name.as_bytes().iter().take(255)) {
            *dst = b as c_char;
        }
        write_out("info", info, out)
    })
}

/// Allocates `bytes` bytes in the context's memory: device memory on a CUDA context, 64-byte aligned
/// host memory on the CPU backend. A utility for callers; ops themselves never allocate.
#[no_mangle]
pub extern "C" fn sparkinfer_malloc(
    ctx: *const sparkinfer_context,
    bytes: usize,
    out: *mut *mut c_void,
) -> sparkinfer_status {
    guard(|| {
        let ctx = context_ref(ctx)?;
        if out.is_null() {
            return Err(Error::invalid("out: NULL output pointer"));
        }
        if bytes == 0 {
            return Err(Error::invalid("bytes: must be positive"));
        }
        let ptr = match ctx.backend() {
            Backend::Cpu => {
                let mut p: *mut c_void = std::ptr::null_mut();
                if unsafe { libc::posix_memalign(&mut p, 64, bytes) } != 0 {
                    return Err(Error::new(
                        crate::Status::OutOfMemory,
                        format!("bytes: {bytes} could not be allocated"),
                    ));
                }
                p
            }
            Backend::Cuda(d) => d.alloc(bytes)? as *mut c_void,
        };
        write_out("out", out, ptr)
    })
}

/// Frees memory from sparkinfer_malloc. NULL is ignored.
#[no_mangle]
pub extern "C" fn sparkinfer_free(ctx: *const sparkinfer_context, ptr: *mut c_void) -> sparkinfer_status {
    guard(|| {
        let ctx = context_ref(ctx)?;
        if ptr.is_null() {
            return Ok(());
        }
        match ctx.backend() {
            Backend::Cpu => unsafe { libc::free(ptr) },
            Backend::Cuda(d) => unsafe { d.free(ptr as u64)? },
        }
        Ok(())
    })
}

/// Copies `bytes` bytes between any two pointers of the context (host or device, in either direction)
/// and waits for the copy. A utility for callers, not meant for a decode step.
#[no_mangle]
pub extern "C" fn sparkinfer_memcpy(
    ctx: *const sparkinfer_context,
    dst: *mut c_void,
    src: *const c_void,
    bytes: usize,
) -> sparkinfer_status {
    guard(|| {
        let ctx = context_ref(ctx)?;
        if bytes == 0 {
            return Ok(());
        }
        if dst.is_null() {
            return Err(Error::invalid("dst: NULL pointer"));
        }
        if src.is_null() {
            return Err(Error::invalid("src: NULL pointer"));
        }
        match ctx.backend() {
            Backend::Cpu => unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) },
            Backend::Cuda(d) => unsafe { d.copy(dst as u64, src as u64, bytes)? },
        }
        Ok(())
    })
}

/// Creates a non-blocking stream on the context's device. The CPU backend has no streams: it stores NULL.
#[no_mangle]
pub extern "C" fn sparkinfer_stream_create(
    ctx: *const sparkinfer_context,
    out: *mut sparkinfer_stream,
) -> sparkinfer_status {
    guard(|| {
        let ctx = context_ref(ctx)?;
        let stream = match ctx.backend() {
            Backend::Cpu => std::ptr::null_mut(),
            Backend::Cuda(d) => {
                if out.is_null() {
                    return Err(Error::invalid("out: NULL output pointer"));
                }
                d.stream_create()?
            }
        };
        write_out("out", out, stream)
    })
}

/// Destroys a stream from sparkinfer_stream_create. NULL is ignored.
#[no_mangle]
pub extern "C" fn sparkinfer_stream_destroy(
    ctx: *const sparkinfer_context,
    stream: sparkinfer_stream,
) -> sparkinfer_status {
    guard(|| {
        let ctx = context_ref(ctx)?;
        if stream.is_null() {
            return Ok(());
        }
        unsafe { ctx.device("sparkinfer_stream_destroy")?.stream_destroy(stream) }
    })
}

/// Waits for all work on `stream` (NULL: the legacy stream). A no-op on the CPU backend.
#[no_mangle]
pub extern "C" fn sparkinfer_stream_synchronize(
    ctx: *const sparkinfer_context,
    stream: sparkinfer_stream,
) -> sparkinfer_status {
    guard(|| {
        let ctx = context_ref(ctx)?;
        match ctx.backend() {
            Backend::Cpu => ctx.check_stream(unsafe { crate::ops::Stream::from_raw(stream) }),
            Backend::Cuda(d) => unsafe { d.stream_synchronize(stream) },
        }
    })
}

/// Starts capturing the work issued on `stream` into a graph, in global capture mode: any call that would
/// synchronise or allocate, from any thread, fails the capture. `stream` must not be NULL (the legacy
/// stream cannot be captured). The first use of a kernel may happen inside a capture.
#[no_mangle]
pub extern "C" fn sparkinfer_graph_begin_capture(
    ctx: *const sparkinfer_context,
    stream: sparkinfer_stream,
) -> sparkinfer_status {
    guard(|| {
        let ctx = context_ref(ctx)?;
        let device = ctx.device("graph capture")?;
        unsafe { runtime::graph::begin_capture(device, stream) }
    })
}

/// Ends the capture begun on `stream` and instantiates it into `*out`.
#[no_mangle]
pub extern "C" fn sparkinfer_graph_end_capture(
    ctx: *const sparkinfer_context,
    stream: sparkinfer_stream,
    out: *mut *mut sparkinfer_graph,
) -> sparkinfer_status {
    guard(|| {
        let ctx = context_ref(ctx)?;
        if out.is_null() {
            return Err(Error::invalid("out: NULL output pointer"));
        }
        unsafe { out.write(std::ptr::null_mut()) };
        let device = ctx.device("graph capture")?;
        let graph = unsafe { runtime::graph::end_capture(device, stream)? };
        write_out("out", out, Box::into_raw(Box::new(sparkinfer_graph { inner: graph })))
    })
}

/// Replays `graph` on `stream`. Inputs are read from the addresses used at capture time, so new values
/// written there are picked up.
#[no_mangle]
pub extern "C" fn sparkinfer_graph_launch(
    ctx: *const sparkinfer_context,
    graph: *const sparkinfer_graph,
    stream: sparkinfer_stream,
) -> sparkinfer_status {
    guard(|| {
        let ctx = context_ref(ctx)?;
        if graph.is_null() {
            return Err(Error::invalid("graph: NULL graph"));
        }
        let device = ctx.device("graph launch")?;
        unsafe { (*graph).inner.launch(device, stream) }
    })
}

/// Destroys a graph. NULL is ignored.
#[no_mangle]
pub extern "C" fn sparkinfer_graph_destroy(graph: *mut sparkinfer_graph) {
    if graph.is_null() {
        return;
    }
    let _ = guard(|| {
        drop(unsafe { Box::from_raw(graph) });
        Ok(())
    });
}
