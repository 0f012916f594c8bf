//! The C surface: `#[no_mangle] extern "C"` functions, `#[repr(C)]` types and constants, from which
//! cbindgen generates `include/sparkinfer/sparkinfer.h`.
//!
//! Every function checks its arguments, runs inside `catch_unwind` (no panic crosses the boundary) and
//! returns a sparkinfer_status; on failure sparkinfer_last_error says what went wrong.
#![allow(non_camel_case_types)]
// The exported functions take raw pointers from C by design: each one checks what can be checked (NULL,
// alignment, device residency) and documents what the caller must guarantee.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

mod attention;
mod context;
mod moe;
mod ops;

#[allow(unused_imports)]
pub use attention::*;
pub use context::*;
#[allow(unused_imports)]
pub use moe::*;
pub use ops::*;

use crate::error::{Error, Result, Status};
use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Result of every call.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum sparkinfer_status {
    SPARKINFER_STATUS_SUCCESS = 0,
    /// An argument is NULL, out of range, misaligned, or inconsistent with another; the message names it.
    SPARKINFER_STATUS_INVALID_ARGUMENT = 1,
    /// A valid request that this build or device does not support (a shape, the backend).
    SPARKINFER_STATUS_UNSUPPORTED = 2,
    /// The CUDA driver could not be loaded or initialised, or there is no such device.
    SPARKINFER_STATUS_CUDA_UNAVAILABLE = 3,
    /// NVRTC could not be loaded; the message says how to install it.
    SPARKINFER_STATUS_COMPILER_UNAVAILABLE = 4,
    /// A CUDA driver call failed; the message names the call and the driver's error.
    SPARKINFER_STATUS_CUDA_ERROR = 5,
    /// NVRTC failed to compile a kernel; the message holds its log.
    SPARKINFER_STATUS_COMPILE_ERROR = 6,
    SPARKINFER_STATUS_OUT_OF_MEMORY = 7,
    /// A bug in sparkinfer (a caught panic, a broken invariant).
    SPARKINFER_STATUS_INTERNAL = 8,
}

impl From<Status> for sparkinfer_status {
    fn from(s: Status) -> Self {
        use sparkinfer_status::*;
        match s {
            Status::Success => SPARKINFER_STATUS_SUCCESS,
            Status::InvalidArgument => SPARKINFER_STATUS_INVALID_ARGUMENT,
            Status::Unsupported => SPARKINFER_STATUS_UNSUPPORTED,
            Status::CudaUnavailable => SPARKINFER_STATUS_CUDA_UNAVAILABLE,
            Status::CompilerUnavailable => SPARKINFER_STATUS_COMPILER_UNAVAILABLE,
            Status::CudaError => SPARKINFER_STATUS_CUDA_ERROR,
            Status::CompileError => SPARKINFER_STATUS_COMPILE_ERROR,
            Status::OutOfMemory => SPARKINFER_STATUS_OUT_OF_MEMORY,
            Status::Internal => SPARKINFER_STATUS_INTERNAL,
        }
    }
}

pub const SPARKINFER_VERSION_MAJOR: u32 = 0;
pub const SPARKINFER_VERSION_MINOR: u32 = 1;
pub const SPARKINFER_VERSION_PATCH: u32 = 0;
/// ABI version; the shared library's soname is `libsparkinfer.so.<ABI version>`.
pub const SPARKINFER_ABI_VERSION: u32 = 0;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    let c = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

/// Runs `f`, turning errors and panics into a status and the thread's last-error message.
pub(crate) fn guard(f: impl FnOnce() -> Result<()>) -> sparkinfer_status {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => sparkinfer_status::SPARKINFER_STATUS_SUCCESS,
        Ok(Err(e)) => {
            set_last_error(&e.message);
            e.status.into()
        }
        Err(payload) => {
            set_last_error(&format!("internal error (caught panic): {}", panic_text(payload.as_ref())));
            sparkinfer_status::SPARKINFER_STATUS_INTERNAL
        }
    }
}

/// Writes through an output pointer after checking it is not NULL.
pub(crate) fn write_out<T>(name: &str, out: *mut T, value: T) -> Result<()> {
    if out.is_null() {
        return Err(Error::invalid(format!("{name}: NULL output pointer")));
    }
    unsafe { out.write(value) };
    Ok(())
}

/// The name of a status code ("SUCCESS", "INVALID_ARGUMENT", ...); "UNKNOWN_STATUS" for other values.
/// The string is static.
#[no_mangle]
pub extern "C" fn sparkinfer_status_string(status: i32) -> *const c_char {
    let s: &'static [u8] = match status {
        0 => b"SUCCESS\0",
        1 => b"INVALID_ARGUMENT\0",
        2 => b"UNSUPPORTED\0",
        3 => b"CUDA_UNAVAILABLE\0",
        4 => b"COMPILER_UNAVAILABLE\0",
        5 => b"CUDA_ERROR\0",
        6 => b"COMPILE_ERROR\0",
        7 => b"OUT_OF_MEMORY\0",
        8 => b"INTERNAL\0",
        _ => b"UNKNOWN_STATUS\0",
    };
    s.as_ptr() as *const c_char
}

/// The message of the last failed call on this thread ("" if none has failed). The pointer stays valid
/// until the next failing call on the same thread; successful calls leave it unchanged.
#[no_mangle]
pub extern "C" fn sparkinfer_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// The library version string ("MAJOR.MINOR.PATCH"), static.
#[no_mangle]
pub extern "C" fn sparkinfer_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char
}

/// The ABI version of the loaded library; compare with SPARKINFER_ABI_VERSION from the header.
#[no_mangle]
pub extern "C" fn sparkinfer_abi_version() -> u32 {
    crate::ABI_VERSION
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    #[test]
    fn guard_turns_a_panic_into_internal() {
        let status = guard(|| panic!("boom in a kernel wrapper"));
        assert_eq!(status, sparkinfer_status::SPARKINFER_STATUS_INTERNAL);
        let msg = unsafe { CStr::from_ptr(sparkinfer_last_error()) }.to_str().unwrap().to_string();
        assert!(msg.contains("boom in a kernel wrapper"), "{msg}");
    }

    #[test]
    fn version_constants_match_the_package() {
        assert_eq!(SPARKINFER_VERSION_MAJOR.to_string(), env!("CARGO_PKG_VERSION_MAJOR"));
        assert_eq!(SPARKINFER_VERSION_MINOR.to_string(), env!("CARGO_PKG_VERSION_MINOR"));
        assert_eq!(SPARKINFER_VERSION_PATCH.to_string(), env!("CARGO_PKG_VERSION_PATCH"));
        assert_eq!(SPARKINFER_ABI_VERSION, crate::ABI_VERSION);
        assert_eq!(SPARKINFER_DEVICE_CPU, crate::ops::DEVICE_CPU);
    }
}
