//! Errors and the status codes they map to at the C boundary.

use std::fmt;

/// Outcome class of a call; the C API returns it as `sparkinfer_status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    Success,
    InvalidArgument,
    Unsupported,
    CudaUnavailable,
    CompilerUnavailable,
    CudaError,
    CompileError,
    OutOfMemory,
    Internal,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Success => "success",
            Status::InvalidArgument => "invalid argument",
            Status::Unsupported => "unsupported",
            Status::CudaUnavailable => "CUDA driver unavailable",
            Status::CompilerUnavailable => "NVRTC compiler unavailable",
            Status::CudaError => "CUDA error",
            Status::CompileError => "kernel compile error",
            Status::OutOfMemory => "out of memory",
            Status::Internal => "internal error",
        }
    }
}

/// An error with its status and a message that names the argument or call that failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    pub status: Status,
    pub message: String,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(status: Status, message: impl Into<String>) -> Self {
        Error { status, message: message.into() }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Status::InvalidArgument, message)
    }
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(Status::Unsupported, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Status::Internal, message)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.status.as_str(), self.message)
    }
}

impl std::error::Error for Error {}

impl From<cudarc::driver::DriverError> for Error {
    fn from(e: cudarc::driver::DriverError) -> Self {
        use cudarc::driver::sys::cudaError_enum as E;
        let name = e.error_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let text = e.error_string().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let status = match e.0 {
            E::CUDA_ERROR_OUT_OF_MEMORY => Status::OutOfMemory,
            E::CUDA_ERROR_NO_DEVICE | E::CUDA_ERROR_NOT_INITIALIZED => Status::CudaUnavailable,
            _ => Status::CudaError,
        };
        Error::new(status, format!("{name} ({text})"))
    }
}

/// Adds the failing call's name to a driver error: `cuda(cuModuleLoadData)?`.
pub(crate) trait CudaContextExt<T> {
    fn during(self, what: &str) -> Result<T>;
}

impl<T> CudaContextExt<T> for std::result::Result<T, cudarc::driver::DriverError> {
    fn during(self, what: &str) -> Result<T> {
        self.map_err(|e| {
            let e = Error::from(e);
            Error::new(e.status, format!("{what} failed: {}", e.message))
        })
    }
}
