//! A CUDA device: its primary context, the kernels compiled for it, launches on borrowed streams.

use super::cache;
use super::jit;
use super::libs;
use super::sources::KernelSource;
use crate::error::{CudaContextExt, Error, Result};
use cudarc::driver::sys;
use cudarc::driver::{CudaContext, CudaModule};
use std::collections::HashMap;
use std::ffi::c_void;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

/// What `sparkinfer info` and `sparkinfer_context_device_info` report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: i32,
    pub name: String,
    pub cc_major: i32,
    pub cc_minor: i32,
    pub sm_count: i32,
    pub total_memory: u64,
    pub l2_bytes: i32,
    pub max_shared_per_block_optin: i32,
    /// Shared memory of one SM, for all its resident blocks together.
    pub max_shared_per_sm: i32,
    /// Shared memory the hardware reserves for each resident block (1 KiB from sm_80 on): it counts against
    /// the SM's shared memory beside the block's own.
    pub reserved_shared_per_block: i32,
}

impl DeviceInfo {
    /// NVRTC architecture name: `sm_90`, `sm_120`, `sm_121`, `sm_110`.
    pub fn arch(&self) -> String {
        format!("sm_{}{}", self.cc_major, self.cc_minor)
    }

    /// Blocks of `shared_bytes` of shared memory each that one SM holds at once, by shared memory alone
    /// (each block also takes the reserved share).
    pub fn blocks_per_sm_by_shared(&self, shared_bytes: usize) -> usize {
        let per_block = shared_bytes + self.reserved_shared_per_block.max(0) as usize;
        self.max_shared_per_sm.max(0) as usize / per_block.max(1)
    }

    /// Dynamic shared memory to request for a block that needs `need_bytes`, so that at most `blocks` such
    /// blocks are resident on an SM at once: `need_bytes` if that already holds, else the least 16-byte
    /// multiple above the SM's share of `blocks + 1`. `None` when that exceeds what one block may opt in to.
    pub fn shared_for_blocks_per_sm(&self, need_bytes: usize, blocks: usize) -> Option<usize> {
        if self.blocks_per_sm_by_shared(need_bytes) <= blocks {
            return Some(need_bytes);
        }
        let reserved = self.reserved_shared_per_block.max(0) as usize;
        let share = (self.max_shared_per_sm.max(0) as usize / (blocks + 1)).saturating_sub(reserved);
        let bytes = need_bytes.max((share + 1).next_multiple_of(16));
        (bytes <= self.max_shared_per_block_optin.max(0) as usize).then_some(bytes)
    }
}

/// A loaded kernel function; it keeps its module alive.
pub struct Kernel {
    _module: Arc<CudaModule>,
    func: sys::CUfunction,
    pub lowered_name: String,
    /// The dynamic shared memory limit set on the function so far (0: the default 48 KiB).
    max_dynamic_shared: AtomicU32,
}

// The CUfunction handle is immutable once loaded and valid on any thread of the context.
unsafe impl Send for Kernel {}
unsafe impl Sync for Kernel {}

impl Kernel {
    /// Lets the kernel use more than 48 KiB of dynamic shared memory. Ops call it before every launch; the
    /// driver is called only when the limit grows (once per kernel in practice).
    pub fn set_max_dynamic_shared(&self, bytes: u32) -> Result<()> {
        if bytes <= self.max_dynamic_shared.load(Ordering::Acquire) {
            return Ok(());
        }
        let rc = unsafe {
            sys::cuFuncSetAttribute(
                self.func,
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
        };
        rc.result().during("cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)")?;
        self.max_dynamic_shared.fetch_max(bytes, Ordering::AcqRel);
        Ok(())
    }
}

/// One device's primary context plus the kernels compiled for it.
pub struct Device {
    ctx: Arc<CudaContext>,
    pub info: DeviceInfo,
    arch: String,
    cache_dir: Option<PathBuf>,
    /// Loaded kernels by source name, then by name expression (looked up by `&str`, so a launch with a
    /// cached kernel allocates nothing here).
    kernels: Mutex<HashMap<&'static str, HashMap<String, Arc<Kernel>>>>,
}

/// Number of CUDA devices, or the reason there are none to use.
pub fn device_count() -> Result<i32> {
    libs::require_driver()?;
    let mut n = 0;
    unsafe { sys::cuDeviceGetCount(&mut n) }.result().during("cuDeviceGetCount")?;
    Ok(n)
}

/// Switches this thread's capture mode to relaxed for the guard's life, so that module loading (which
/// the driver forbids under global-mode capture) can happen the first time a kernel is used inside a
/// capture. The previous mode is restored on drop.
struct RelaxedCaptureMode(sys::CUstreamCaptureMode);

impl RelaxedCaptureMode {
    fn enter() -> Self {
        let mut mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED;
        unsafe { sys::cuThreadExchangeStreamCaptureMode(&mut mode) };
        RelaxedCaptureMode(mode)
    }
}

impl Drop for RelaxedCaptureMode {
    fn drop(&mut self) {
        unsafe { sys::cuThreadExchangeStreamCaptureMode(&mut self.0) };
    }
}

impl Device {
    pub fn new(ordinal: i32) -> Result<Device> {
        let count = device_count()?;
        if ordinal < 0 || ordinal >= count {
            return Err(Error::invalid(format!(
                "device: ordinal {ordinal} is out of range, this machine has {count} CUDA device(s)"
            )));
        }
        let ctx = CudaContext::new(ordinal as usize).during("cuDevicePrimaryCtxRetain")?;
        // Pointers come from the caller, not from cudarc: nothing for cudarc to track.
        unsafe { ctx.disable_event_tracking() };
        let attr = |a: sys::CUdevice_attribute, what: &str| ctx.attribute(a).during(what);
        let (cc_major, cc_minor) = ctx.compute_capability().during("cuDeviceGetAttribute(compute capability)")?;
        let info = DeviceInfo {
            ordinal,
            name: ctx.name().during("cuDeviceGetName")?,
            cc_major,
            cc_minor,
            sm_count: attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, "SM count")?,
            total_memory: ctx.total_mem().during("cuDeviceTotalMem")? as u64,
            l2_bytes: attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE, "L2 size")?,
            max_shared_per_block_optin: attr(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
                "shared memory per block",
            )?,
            max_shared_per_sm: attr(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR,
                "shared memory per SM",
            )?,
            reserved_shared_per_block: attr(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_RESERVED_SHARED_MEMORY_PER_BLOCK,
                "reserved shared memory per block",
            )?,
        };
        let arch = info.arch();
        Ok(Device { ctx, info, arch, cache_dir: cache::cache_dir(), kernels: Mutex::new(HashMap::new()) })
    }

    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Makes the device's primary context current on this thread.
    pub fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().during("cuCtxSetCurrent")
    }

    /// The kernel `name_expr` of `source`, compiled on first use (or read from the disk cache).
    pub fn kernel(&self, source: &'static KernelSource, name_expr: &str) -> Result<Arc<Kernel>> {
        let lock = || self.kernels.lock().map_err(|_| Error::internal("kernel table poisoned"));
        if let Some(k) = lock()?.get(source.name).and_then(|by_expr| by_expr.get(name_expr)) {
            return Ok(k.clone());
        }
        // Compile outside the lock; a concurrent first use compiles twice and keeps one.
        let kernel = Arc::new(self.load_kernel(source, name_expr)?);
        let mut table = lock()?;
        Ok(table.entry(source.name).or_default().entry(name_expr.to_string()).or_insert(kernel).clone())
    }

    fn load_kernel(&self, source: &'static KernelSource, name_expr: &str) -> Result<Kernel> {
        let exprs = [name_expr.to_string()];
        let nvrtc_version = libs::require_nvrtc()?;
        let key = format!(
            "{}|{:016x}|{}|{:?}|nvrtc {}.{}|{}",
            source.path,
            source.content_hash(),
            self.arch,
            jit::options(&self.arch, false),
            nvrtc_version.0,
            nvrtc_version.1,
            name_expr
        );
        let path = self.cache_dir.as_ref().map(|d| cache::entry_path(d, source.name, &key));
        let _relaxed = RelaxedCaptureMode::enter();
        self.bind()?;
        if let Some(module) = path.as_ref().and_then(|p| cache::load(p, &key)) {
            if let Ok(k) = self.module_kernel(&module, name_expr) {
                return Ok(k);
            }
            // A cubin that the driver refuses is as corrupt as one that fails its checksum: recompile.
        }
        let module = jit::compile(source, &exprs, &self.arch, false)?;
        let kernel = self.module_kernel(&module, name_expr)?;
        if let Some(p) = path.as_ref() {
            // The cache only saves time; a read-only or full disk must not fail the launch.
            let _ = cache::store(p, &key, &module);
        }
        Ok(kernel)
    }

    fn module_kernel(&self, module: &jit::CompiledModule, name_expr: &str) -> Result<Kernel> {
        let lowered = module
            .lowered_names
            .iter()
            .find(|(e, _)| e == name_expr)
            .map(|(_, l)| l.clone())
            .ok_or_else(|| Error::internal(format!("{name_expr} missing from its compiled module")))?;
        let m =
            self.ctx.load_module(cudarc::nvrtc::Ptx::from_binary(module.cubin.clone())).during("cuModuleLoadData")?;
        let f = m.load_function(&lowered).during("cuModuleGetFunction")?;
        Ok(Kernel { func: f.cu_function(), _module: m, lowered_name: lowered, max_dynamic_shared: AtomicU32::new(0) })
    }

    /// Launches `kernel` on the caller's stream. `args` points at each kernel argument in order.
    ///
    /// # Safety
    /// `args` must match the kernel's parameter list exactly, and every pointer in them must be valid for
    /// the accesses the kernel makes.
    pub unsafe fn launch(
        &self,
        kernel: &Kernel,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_bytes: u32,
        stream: sys::CUstream,
        args: &mut [*mut c_void],
    ) -> Result<()> {
        self.launch_ex(kernel, grid, block, shared_bytes, stream, args, false)
    }

    /// Launches `kernel` on the caller's stream with programmatic stream serialisation (sm_90 and newer):
    /// the kernel may be scheduled while the previous kernel on the stream finishes, which hides most of
    /// its launch latency in a chain of kernels. Only for kernels that call `pdl_wait()` (common.cuh)
    /// before any global memory access; ordering is then that of a plain launch. Before sm_90 this is
    /// [`Device::launch`].
    ///
    /// # Safety
    /// As [`Device::launch`], and the kernel must begin with `pdl_wait()`.
    pub unsafe fn launch_dependent(
        &self,
        kernel: &Kernel,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_bytes: u32,
        stream: sys::CUstream,
        args: &mut [*mut c_void],
    ) -> Result<()> {
        self.launch_ex(kernel, grid, block, shared_bytes, stream, args, self.info.cc_major >= 9)
    }

    unsafe fn launch_ex(
        &self,
        kernel: &Kernel,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_bytes: u32,
        stream: sys::CUstream,
        args: &mut [*mut c_void],
        programmatic: bool,
    ) -> Result<()> {
        self.bind()?;
        let mut attr: sys::CUlaunchAttribute = std::mem::zeroed();
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block.0,
            blockDimY: block.1,
            blockDimZ: block.2,
            sharedMemBytes: shared_bytes,
            hStream: stream,
            attrs: &mut attr,
            numAttrs: u32::from(programmatic),
        };
        sys::cuLaunchKernelEx(&config, kernel.func, args.as_mut_ptr(), std::ptr::null_mut())
            .result()
            // The message is built only on failure: launches are the hot path.
            .map_err(|e| {
                let e = Error::from(e);
                Error::new(e.status, format!("cuLaunchKernel({}) failed: {}", kernel.lowered_name, e.message))
            })
    }

    /// Checks that `[ptr, ptr + bytes)` is memory this device can access: device, managed or
    /// registered host memory of this context, inside one allocation. `name` names the argument.
    pub fn check_buffer(&self, name: &str, ptr: u64, bytes: u64) -> Result<()> {
        let mut mem_type: u32 = 0;
        let mut ordinal: i32 = -1;
        let mut start: u64 = 0;
        let mut size: usize = 0;
        let mut attrs = [
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_RANGE_SIZE,
        ];
        let mut data: [*mut c_void; 4] = [
            &mut mem_type as *mut u32 as *mut c_void,
            &mut ordinal as *mut i32 as *mut c_void,
            &mut start as *mut u64 as *mut c_void,
            &mut size as *mut usize as *mut c_void,
        ];
        self.bind()?;
        unsafe { sys::cuPointerGetAttributes(attrs.len() as u32, attrs.as_mut_ptr(), data.as_mut_ptr(), ptr) }
            .result()
            .during("cuPointerGetAttributes")?;
        if mem_type == 0 {
            return Err(Error::invalid(format!(
                "{name}: {ptr:#x} is not device memory (a host pointer given to a CUDA context?)"
            )));
        }
        if ordinal >= 0 && ordinal != self.info.ordinal {
            return Err(Error::invalid(format!(
                "{name}: {ptr:#x} belongs to device {ordinal}, the context is on device {}",
                self.info.ordinal
            )));
        }
        // Managed and registered host memory may report no range; only device allocations are bounded.
        if size > 0 && start > 0 {
            let end = start.saturating_add(size as u64);
            if ptr.checked_add(bytes).is_none_or(|e| e > end) {
                return Err(Error::invalid(format!(
                    "{name}: {bytes} bytes from {ptr:#x} run past the end of its allocation ({} bytes left)",
                    end.saturating_sub(ptr)
                )));
            }
        }
        Ok(())
    }

    /// Allocates device memory (a utility for callers and tests; ops never allocate).
    pub fn alloc(&self, bytes: usize) -> Result<u64> {
        self.bind()?;
        unsafe { cudarc::driver::result::malloc_sync(bytes.max(1)) }.during("cuMemAlloc")
    }

    /// # Safety
    /// `ptr` must come from [`Device::alloc`] and not be used afterwards.
    pub unsafe fn free(&self, ptr: u64) -> Result<()> {
        self.bind()?;
        cudarc::driver::result::free_sync(ptr).during("cuMemFree")
    }

    /// Synchronous copy between any two pointers of the unified address space: the copy has landed when
    /// this returns.
    ///
    /// cuMemcpy alone does not promise that: from pageable host memory it returns once the data is
    /// staged, and device to device it does not wait at all, while the caller's kernels run on
    /// non-blocking streams that do not order themselves after the legacy stream's copy. Hence the
    /// context synchronisation.
    ///
    /// # Safety
    /// Both ranges must be valid for `bytes` bytes.
    pub unsafe fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        self.bind()?;
        sys::cuMemcpy(dst, src, bytes).result().during("cuMemcpy")?;
        sys::cuCtxSynchronize().result().during("cuCtxSynchronize")
    }

    /// Sets `bytes` bytes at `ptr` to `value` and waits until they are set (cuMemsetD8 on device memory
    /// returns before it completes; see [`Device::copy`]).
    ///
    /// # Safety
    /// The range must be valid device memory of this context.
    pub unsafe fn fill(&self, ptr: u64, value: u8, bytes: usize) -> Result<()> {
        self.bind()?;
        sys::cuMemsetD8_v2(ptr, value, bytes).result().during("cuMemsetD8")?;
        sys::cuCtxSynchronize().result().during("cuCtxSynchronize")
    }

    pub fn stream_create(&self) -> Result<sys::CUstream> {
        self.bind()?;
        let mut s = std::ptr::null_mut();
        unsafe { sys::cuStreamCreate(&mut s, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32) }
            .result()
            .during("cuStreamCreate")?;
        Ok(s)
    }

    /// # Safety
    /// `stream` must be a stream of this context that nothing uses afterwards.
    pub unsafe fn stream_destroy(&self, stream: sys::CUstream) -> Result<()> {
        self.bind()?;
        sys::cuStreamDestroy_v2(stream).result().during("cuStreamDestroy")
    }

    /// # Safety
    /// `stream` must be a valid stream of this context (or NULL for the legacy stream).
    pub unsafe fn stream_synchronize(&self, stream: sys::CUstream) -> Result<()> {
        self.bind()?;
        sys::cuStreamSynchronize(stream).result().during("cuStreamSynchronize")
    }
}
