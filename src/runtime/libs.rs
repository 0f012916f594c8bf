//! Probing for the CUDA driver and NVRTC before cudarc touches them: cudarc panics when a library or a
//! symbol is missing, so every entry point asks here first and turns absence into a status.

use crate::error::{Error, Result, Status};
use std::ffi::CString;
use std::sync::OnceLock;

/// Environment variable naming the NVRTC library file to use (`.../libnvrtc.so.13`). Without it NVRTC is
/// looked up on the ordinary library path (`LD_LIBRARY_PATH`, ld.so.cache).
pub const NVRTC_LIBRARY_ENV: &str = "SPARKINFER_NVRTC_LIBRARY";

pub const NVRTC_INSTALL_HINT: &str = "install NVRTC 13 (for example `pip install nvidia-cuda-nvrtc==13.0.*`, then add \
     its nvidia/cu13/lib folder to LD_LIBRARY_PATH) or point SPARKINFER_NVRTC_LIBRARY at libnvrtc.so.13";

/// Loads the library named by SPARKINFER_NVRTC_LIBRARY (and its builtins beside it) into the process with
/// RTLD_GLOBAL, so that cudarc's later lookup by soname finds the loaded copy.
fn preload_nvrtc_from_env() -> std::result::Result<(), String> {
    static PRELOAD: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    PRELOAD
        .get_or_init(|| {
            let Some(path) = std::env::var_os(NVRTC_LIBRARY_ENV) else {
                return Ok(());
            };
            let path = std::path::PathBuf::from(path);
            if let Some(dir) = path.parent() {
                // NVRTC opens its builtins library by name at compile time; load it first when it is
                // beside the named library so that the name resolves to this copy.
                if let Ok(entries) = std::fs::read_dir(dir) {
                    for entry in entries.flatten() {
                        let name = entry.file_name();
                        let name = name.to_string_lossy();
                        if name.starts_with("libnvrtc-builtins.so") && !name.contains(".alt.") {
                            dlopen_global(&entry.path());
                        }
                    }
                }
            }
            if dlopen_global(&path) {
                Ok(())
            } else {
                Err(format!("{NVRTC_LIBRARY_ENV}={} could not be loaded: {}", path.display(), dlerror_text()))
            }
        })
        .clone()
}

fn dlopen_global(path: &std::path::Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // The handle is kept for the life of the process on purpose: the library must stay loaded.
    let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    !handle.is_null()
}

fn dlerror_text() -> String {
    let msg = unsafe { libc::dlerror() };
    if msg.is_null() {
        "unknown dlopen error".into()
    } else {
        unsafe { std::ffi::CStr::from_ptr(msg) }.to_string_lossy().into_owned()
    }
}

/// Ok when `libcuda` can be loaded and initialised.
pub fn require_driver() -> Result<()> {
    static DRIVER: OnceLock<Result<()>> = OnceLock::new();
    DRIVER
        .get_or_init(|| {
            if !unsafe { cudarc::driver::sys::is_culib_present() } {
                return Err(Error::new(
                    Status::CudaUnavailable,
                    "the CUDA driver library (libcuda.so) was not found: install the NVIDIA driver",
                ));
            }
            cudarc::driver::result::init().map_err(|e| {
                let e = Error::from(e);
                Error::new(Status::CudaUnavailable, format!("cuInit failed: {}", e.message))
            })
        })
        .clone()
}

/// NVRTC's version when the library can be loaded.
pub fn require_nvrtc() -> Result<(i32, i32)> {
    static NVRTC: OnceLock<Result<(i32, i32)>> = OnceLock::new();
    NVRTC
        .get_or_init(|| {
            preload_nvrtc_from_env()
                .map_err(|e| Error::new(Status::CompilerUnavailable, format!("{e}; {NVRTC_INSTALL_HINT}")))?;
            if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
                return Err(Error::new(
                    Status::CompilerUnavailable,
                    format!("NVRTC (libnvrtc.so) was not found: {NVRTC_INSTALL_HINT}"),
                ));
            }
            let (mut major, mut minor) = (0, 0);
            let rc = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
            if rc != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
                return Err(Error::new(Status::CompilerUnavailable, format!("nvrtcVersion failed: {rc:?}")));
            }
            Ok((major, minor))
        })
        .clone()
}

/// Driver API version (for `sparkinfer info`).
pub fn driver_version() -> Result<i32> {
    require_driver()?;
    let mut v = 0;
    let rc = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    rc.result().map_err(Error::from)?;
    Ok(v)
}
