//! GEMV / skinny GEMM for decode: `y[M, N] = x[M, K] · W[N, K]ᵀ`.

use super::{check_dim, check_ptr, Backend, Context, Matrix, MatrixMut, Stream};
use crate::error::{Error, Result};
use crate::kernel_name;
use crate::reference;
use crate::runtime::name::KernelName;
use crate::runtime::sources::KernelSource;

pub static SOURCE: KernelSource = KernelSource {
    name: "gemv",
    path: "gemm/gemv.cu",
    code: include_str!("../../csrc/cuda/gemm/gemv.cu"),
    instantiations,
};

/// Rows of x handled by one launch; larger batches belong to a tensor-core GEMM.
pub const MAX_M: i64 = 16;
/// Warps (= rows of W) per block, as GEMV_WARPS in the kernel.
const WARPS_PER_BLOCK: usize = 8;
/// Rows of W per warp (the kernel's GEMV_ROWS): two once x's reloads from L1 dominate.
fn rows_per_warp(m: usize) -> usize {
    if m >= 8 {
        2
    } else {
        1
    }
}

/// Element type of `y`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutType {
    Bf16,
    F32,
}

impl OutType {
    fn cuda_name(self) -> &'static str {
        match self {
            OutType::Bf16 => "bf16_t",
            OutType::F32 => "float",
        }
    }
    pub fn bytes(self) -> usize {
        match self {
            OutType::Bf16 => 2,
            OutType::F32 => 4,
        }
    }
}

fn name_expr(m: usize, weights_static: bool, out: OutType) -> KernelName {
    kernel_name!("gemv_kernel<{m}, {}, {weights_static}, {}>", rows_per_warp(m), out.cuda_name())
}

fn instantiations() -> Vec<String> {
    let mut names = Vec::new();
    for m in 1..=MAX_M as usize {
        for weights_static in [false, true] {
            for out in [OutType::Bf16, OutType::F32] {
                names.push(name_expr(m, weights_static, out).to_string());
            }
        }
    }
    names
}

/// Arguments of [`gemv`]: addresses in the context's memory, strides in elements (0 = dense).
#[derive(Clone, Copy, Debug)]
pub struct GemvArgs {
    pub x: u64,
    pub x_row_stride: i64,
    pub w: u64,
    pub w_row_stride: i64,
    pub y: u64,
    pub y_row_stride: i64,
    pub m: i64,
    pub n: i64,
    pub k: i64,
    pub out_type: OutType,
    /// The caller promises that `w` is not written by the kernel just before this op on the stream (true
    /// of model weights during decode): the kernel may then start reading it while that kernel finishes.
    pub weights_static: bool,
}

fn validate(a: &GemvArgs) -> Result<(Matrix, Matrix, Matrix)> {
    if a.m > MAX_M {
        return Err(Error::unsupported(format!("m: {} rows exceed the GEMV limit of {MAX_M}", a.m)));
    }
    let m = check_dim("m", a.m, MAX_M)?;
    let n = check_dim("n", a.n, i32::MAX as i64)?;
    let k = check_dim("k", a.k, i32::MAX as i64)?;
    if n % 8 != 0 {
        return Err(Error::invalid(format!("n: {n} is not a multiple of 8")));
    }
    if k % 8 != 0 {
        return Err(Error::invalid(format!("k: {k} is not a multiple of 8")));
    }
    check_ptr("x", a.x, 16)?;
    check_ptr("w", a.w, 16)?;
    check_ptr("y", a.y, a.out_type.bytes() as u64)?;
    let x = Matrix::new("x", a.x, m, k, a.x_row_stride, 2, 8)?;
    let w = Matrix::new("w", a.w, n, k, a.w_row_stride, 2, 8)?;
    let y = Matrix::new("y", a.y, m, n, a.y_row_stride, a.out_type.bytes(), 1)?;
    if y.overlaps(&x) || y.overlaps(&w) {
        return Err(Error::invalid("y: overlaps x or w"));
    }
    Ok((x, w, y))
}

/// `y = x · Wᵀ` with fp32 accumulation, y in bf16 or fp32.
///
/// # Safety
/// Every address in `a` must point to memory of the context's kind (device memory of its device, or host
/// memory for the CPU backend) holding the extent its shape and strides describe. The extents of device
/// buffers are checked against their allocations; host pointers cannot be checked.
pub unsafe fn gemv(ctx: &Context, a: &GemvArgs, stream: Stream) -> Result<()> {
    ctx.check_stream(stream)?;
    let (x, w, y) = validate(a)?;
    match ctx.backend() {
        Backend::Cpu => {
            unsafe {
                let result = reference::gemv::gemv(&x.read_host_bf16(), &w.read_host_bf16(), x.rows, w.rows, x.cols);
                match a.out_type {
                    OutType::F32 => MatrixMut(y).write_host(&result),
                    OutType::Bf16 => MatrixMut(y).write_host(&reference::to_bf16(&result)),
                }
            }
            Ok(())
        }
        Backend::Cuda(device) => {
            x.check_on_device(device, "x")?;
            w.check_on_device(device, "w")?;
            y.check_on_device(device, "y")?;
            let kernel = device.kernel(&SOURCE, &name_expr(x.rows, a.weights_static, a.out_type))?;
            let mut xp = x.ptr;
            let mut xs = x.row_stride as i64;
            let mut wp = w.ptr;
            let mut ws = w.row_stride as i64;
            let mut yp = y.ptr;
            let mut ys = y.row_stride as i64;
            let mut n = w.rows as i32;
            let mut k = x.cols as i32;
            let mut args = crate::kernel_args![xp, xs, wp, ws, yp, ys, n, k];
            let threads = (WARPS_PER_BLOCK * 32) as u32;
            let blocks = w.rows.div_ceil(WARPS_PER_BLOCK * rows_per_warp(x.rows)) as u32;
            unsafe { device.launch_dependent(&kernel, (blocks, 1, 1), (threads, 1, 1), 0, stream.raw(), &mut args) }
        }
    }
}
