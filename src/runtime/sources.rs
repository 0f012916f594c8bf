//! Kernel sources embedded in the library, and the shared headers they may include.

/// One `.cu` file of `csrc/cuda`, its templates named by the expressions that `ops` instantiates.
pub struct KernelSource {
    /// Short name, used in cache file names and reports (`rmsnorm`).
    pub name: &'static str,
    /// Path below `csrc/cuda`, for messages.
    pub path: &'static str,
    pub code: &'static str,
    /// Every template instantiation the library may launch, for `sparkinfer compile`.
    pub instantiations: fn() -> Vec<String>,
}

/// The headers a kernel may include, by the name it includes them with.
pub const HEADERS: &[(&str, &str)] = &[
    ("common/common.cuh", include_str!("../../csrc/common/common.cuh")),
    ("common/async.cuh", include_str!("../../csrc/common/async.cuh")),
    ("common/mma.cuh", include_str!("../../csrc/common/mma.cuh")),
    ("common/routing.cuh", include_str!("../../csrc/common/routing.cuh")),
];

/// FNV-1a, 64 bit: a stable hash for cache keys (std's hasher is not stable across releases).
pub fn fnv1a64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Separate parts so that ("ab", "c") and ("a", "bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl KernelSource {
    /// Hash of this source and every shared header.
    pub fn content_hash(&self) -> u64 {
        let mut parts: Vec<&[u8]> = vec![self.code.as_bytes()];
        for (name, text) in HEADERS {
            parts.push(name.as_bytes());
            parts.push(text.as_bytes());
        }
        fnv1a64(&parts)
    }
}
