//! Random inputs and comparisons shared by the tests, `sparkinfer check` and the benchmarks.

use crate::reference::bf16;

/// A small deterministic generator (xorshift64*), so that a failing case can be replayed from its seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// A seed that differs between runs (time and process id), printed by callers for replay.
    pub fn fresh_seed() -> u64 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        t ^ ((std::process::id() as u64) << 32)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.uniform()
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-7);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
    }

    /// `n` bf16 values drawn from N(0, scale²).
    pub fn bf16_normal(&mut self, n: usize, scale: f32) -> Vec<bf16> {
        (0..n).map(|_| bf16::from_f32(self.normal() * scale)).collect()
    }
}

/// Outcome of comparing an output with its reference.
#[derive(Clone, Copy, Debug)]
pub struct Comparison {
    pub rel_l2: f64,
    pub non_finite: usize,
}

impl Comparison {
    pub fn new(out: &[f32], reference: &[f32]) -> Comparison {
        let non_finite = out.iter().filter(|v| !v.is_finite()).count();
        Comparison { rel_l2: crate::reference::rel_l2_error(out, reference), non_finite }
    }

    /// The method's bound: ‖out − ref‖ / ‖ref‖ ≤ tol and no NaN or infinity anywhere.
    pub fn passes(&self, tol: f64) -> bool {
        self.non_finite == 0 && self.rel_l2 <= tol
    }
}

/// Tolerance for bf16 outputs computed in fp32 (DESIGN.md, Tests).
pub const BF16_TOL: f64 = 1e-2;
/// Tolerance for fp32 outputs of bf16 inputs accumulated in fp32.
pub const F32_TOL: f64 = 1e-4;

/// Independent f64 formulas, written from the definitions without sharing code with `reference`: the
/// oracle of the reference's own tests and of `sparkinfer check` on the CPU backend.
pub mod naive {
    /// RMSNorm of one row in f64: `x / sqrt(mean(x²) + eps) * (w + offset)`.
    pub fn rmsnorm_row(x: &[f64], w: &[f64], eps: f64, offset: f64) -> Vec<f64> {
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let scale = 1.0 / (ms + eps).sqrt();
        x.iter().zip(w).map(|(v, wv)| v * scale * (wv + offset)).collect()
    }

    /// `y[i][j] = Σ_k x[i][k] w[j][k]` in f64.
    pub fn matmul_nt(x: &[f64], w: &[f64], m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut y = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0.0;
                for t in 0..k {
                    acc += x[i * k + t] * w[j * k + t];
                }
                y[i * n + j] = acc;
            }
        }
        y
    }
}

/// Host memory handed to the CPU backend by address, freed on drop.
pub struct HostAlloc {
    ptr: *mut u8,
    bytes: usize,
}

impl HostAlloc {
    fn new(bytes: usize) -> Self {
        let mut p: *mut libc::c_void = std::ptr::null_mut();
        let rc = unsafe { libc::posix_memalign(&mut p, 64, bytes.max(1)) };
        assert!(rc == 0 && !p.is_null(), "host allocation of {bytes} bytes failed");
        HostAlloc { ptr: p as *mut u8, bytes }
    }
}

impl Drop for HostAlloc {
    fn drop(&mut self) {
        unsafe { libc::free(self.ptr as *mut libc::c_void) };
    }
}

/// A buffer in the context's memory: a device allocation, or host memory on the CPU backend.
pub enum TestBuffer<'a> {
    Host(HostAlloc),
    Device(crate::runtime::buffer::DeviceBuffer<'a>),
}

impl<'a> TestBuffer<'a> {
    pub fn new(ctx: &'a crate::Context, bytes: usize) -> crate::Result<Self> {
        Ok(match ctx.backend() {
            crate::ops::Backend::Cpu => TestBuffer::Host(HostAlloc::new(bytes)),
            crate::ops::Backend::Cuda(d) => TestBuffer::Device(crate::runtime::buffer::DeviceBuffer::new(d, bytes)?),
        })
    }

    pub fn from_slice<T: Copy>(ctx: &'a crate::Context, data: &[T]) -> crate::Result<Self> {
        let b = Self::new(ctx, std::mem::size_of_val(data))?;
        b.upload(data)?;
        Ok(b)
    }

    pub fn ptr(&self) -> u64 {
        match self {
            TestBuffer::Host(h) => h.ptr as u64,
            TestBuffer::Device(d) => d.ptr(),
        }
    }

    pub fn bytes(&self) -> usize {
        match self {
            TestBuffer::Host(h) => h.bytes,
            TestBuffer::Device(d) => d.bytes(),
        }
    }

    pub fn upload<T: Copy>(&self, data: &[T]) -> crate::Result<()> {
        match self {
            TestBuffer::Host(h) => {
                let len = std::mem::size_of_val(data);
                assert!(len <= h.bytes, "upload of {len} bytes into a buffer of {}", h.bytes);
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr() as *const u8, h.ptr, len) };
                Ok(())
            }
            TestBuffer::Device(d) => d.upload(data),
        }
    }

    pub fn download<T: Copy + Default>(&self, len: usize) -> crate::Result<Vec<T>> {
        match self {
            TestBuffer::Host(h) => {
                let mut out = vec![T::default(); len];
                let n = std::mem::size_of_val(out.as_slice());
                assert!(n <= h.bytes, "download of {n} bytes from a buffer of {}", h.bytes);
                unsafe { std::ptr::copy_nonoverlapping(h.ptr, out.as_mut_ptr() as *mut u8, n) };
                Ok(out)
            }
            TestBuffer::Device(d) => d.download(len),
        }
    }

    /// Fills with 0xFF bytes (NaN in bf16 and fp32).
    pub fn poison(&self) -> crate::Result<()> {
        match self {
            TestBuffer::Host(h) => {
                unsafe { std::ptr::write_bytes(h.ptr, 0xff, h.bytes) };
                Ok(())
            }
            TestBuffer::Device(d) => d.poison(),
        }
    }
}
