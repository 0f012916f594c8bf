//! Kernel name expressions built on the stack: an op formats its template instantiation's name on every
//! launch to look the loaded kernel up, and that must not allocate.

use std::fmt;

/// Longest name expression (the longest in use is about 40 bytes; a unit test checks every instantiation).
const CAPACITY: usize = 80;

/// A short string on the stack: `kernel_name!("gemv_kernel<{m}, {s}>")` formats into one.
#[derive(Clone, Copy)]
pub struct KernelName {
    len: usize,
    bytes: [u8; CAPACITY],
}

impl KernelName {
    /// Formats `args`. Names are fixed templates well under the capacity (see the tests of each op's
    /// instantiation list); a longer one would be cut at the last whole piece that fits, fail to match any
    /// compiled kernel and be reported by the lookup.
    pub fn new(args: fmt::Arguments) -> KernelName {
        let mut n = KernelName { len: 0, bytes: [0; CAPACITY] };
        let _ = fmt::write(&mut n, args);
        n
    }

    pub fn as_str(&self) -> &str {
        // Only whole &str pieces are ever copied in, so the bytes are UTF-8.
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or("")
    }

    /// Whether the formatted name fit entirely.
    pub fn fits(args: fmt::Arguments) -> bool {
        fmt::write(&mut KernelName { len: 0, bytes: [0; CAPACITY] }, args).is_ok()
    }
}

impl fmt::Write for KernelName {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        if end > CAPACITY {
            return Err(fmt::Error);
        }
        self.bytes[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

impl std::ops::Deref for KernelName {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Display for KernelName {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for KernelName {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// `kernel_name!("fmt", args...)`: a [`KernelName`] formatted without allocating.
#[macro_export]
macro_rules! kernel_name {
    ($($t:tt)*) => {
        $crate::runtime::name::KernelName::new(format_args!($($t)*))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_refuses_overflow() {
        let n = crate::kernel_name!("gemv_kernel<{}, {}>", 16, true);
        assert_eq!(&*n, "gemv_kernel<16, true>");
        assert!(!KernelName::fits(format_args!("{}", "x".repeat(CAPACITY + 1))));
        assert!(KernelName::fits(format_args!("{}", "x".repeat(CAPACITY))));
    }
}
