//! RMSNorm (+ fused residual add) over bf16 rows.

use super::{check_dim, check_ptr, Backend, Context, Matrix, MatrixMut, Stream};
use crate::error::{Error, Result};
use crate::kernel_name;
use crate::reference::{self, rmsnorm::WeightStyle};
use crate::runtime::name::KernelName;
use crate::runtime::sources::KernelSource;

pub static SOURCE: KernelSource = KernelSource {
    name: "rmsnorm",
    path: "fused/rmsnorm.cu",
    code: include_str!("../../csrc/cuda/fused/rmsnorm.cu"),
    instantiations,
};

/// Largest row length: 16384 values, 8 vectors of 8 per thread of a 256-thread block.
pub const MAX_DIM: i64 = 16384;
const MAX_THREADS: usize = 256;
const MAX_VECTORS_PER_THREAD: usize = 8;

fn name_expr(vectors_per_thread: usize, residual: bool) -> KernelName {
    kernel_name!("rmsnorm_kernel<{vectors_per_thread}, {residual}>")
}

fn instantiations() -> Vec<String> {
    (1..=MAX_VECTORS_PER_THREAD)
        .flat_map(|v| [name_expr(v, false), name_expr(v, true)])
        .map(|n| n.to_string())
        .collect()
}

/// Arguments of [`rmsnorm`]: addresses in the context's memory, strides in elements (0 = dense).
#[derive(Clone, Copy, Debug)]
pub struct RmsNormArgs {
    pub x: u64,
    pub x_row_stride: i64,
    /// 0 for no residual; otherwise read, added to `x`, and overwritten with the sum.
    pub residual: u64,
    pub residual_row_stride: i64,
    pub weight: u64,
    pub out: u64,
    pub out_row_stride: i64,
    pub rows: i64,
    pub dim: i64,
    pub eps: f32,
    pub style: WeightStyle,
}

struct Checked {
    x: Matrix,
    residual: Option<Matrix>,
    weight: Matrix,
    out: Matrix,
}

fn validate(a: &RmsNormArgs) -> Result<Checked> {
    let rows = check_dim("rows", a.rows, i32::MAX as i64)?;
    let dim = check_dim("dim", a.dim, MAX_DIM)?;
    if dim % 8 != 0 {
        return Err(Error::invalid(format!("dim: {dim} is not a multiple of 8")));
    }
    if !a.eps.is_finite() || a.eps < 0.0 {
        return Err(Error::invalid(format!("eps: {} must be finite and non-negative", a.eps)));
    }
    check_ptr("x", a.x, 16)?;
    check_ptr("weight", a.weight, 16)?;
    check_ptr("out", a.out, 16)?;
    let x = Matrix::new("x", a.x, rows, dim, a.x_row_stride, 2, 8)?;
    let weight = Matrix::new("weight", a.weight, 1, dim, 0, 2, 8)?;
    let out = Matrix::new("out", a.out, rows, dim, a.out_row_stride, 2, 8)?;
    let residual = if a.residual == 0 {
        None
    } else {
        check_ptr("residual", a.residual, 16)?;
        Some(Matrix::new("residual", a.residual, rows, dim, a.residual_row_stride, 2, 8)?)
    };
    // In place is allowed (out = x, or out = residual); any other overlap with the output is an error.
    if out.overlaps(&x) && !out.same_as(&x) {
        return Err(Error::invalid("out: overlaps x without being the same matrix"));
    }
    if out.overlaps(&weight) {
        return Err(Error::invalid("out: overlaps weight"));
    }
    if let Some(r) = &residual {
        if r.overlaps(&x) || r.overlaps(&weight) {
            return Err(Error::invalid("residual: overlaps x or weight; it is written"));
        }
        if out.overlaps(r) && !out.same_as(r) {
            return Err(Error::invalid("out: overlaps residual without being the same matrix"));
        }
    }
    Ok(Checked { x, residual, weight, out })
}

/// `out = rmsnorm(x [+ residual]) · w`, with the residual sum written back. See the kernel for the exact
/// definition.
///
/// # Safety
/// Every address in `a` must point to memory of the context's kind (device memory of its device, or host
/// memory for the CPU backend) holding the extent its shape and strides describe. The extents of device
/// buffers are checked against their allocations; host pointers cannot be checked.
pub unsafe fn rmsnorm(ctx: &Context, a: &RmsNormArgs, stream: Stream) -> Result<()> {
    ctx.check_stream(stream)?;
    let c = validate(a)?;
    match ctx.backend() {
        Backend::Cpu => {
            unsafe {
                let x = c.x.read_host_bf16();
                let weight = c.weight.read_host_bf16();
                let mut residual = c.residual.map(|r| r.read_host_bf16());
                let mut out = vec![reference::bf16::ZERO; x.len()];
                reference::rmsnorm::rmsnorm(&x, residual.as_deref_mut(), &weight, &mut out, c.x.cols, a.eps, a.style);
                if let (Some(r), Some(data)) = (c.residual, residual) {
                    MatrixMut(r).write_host(&data);
                }
                MatrixMut(c.out).write_host(&out);
            }
            Ok(())
        }
        Backend::Cuda(device) => {
            c.x.check_on_device(device, "x")?;
            c.weight.check_on_device(device, "weight")?;
            c.out.check_on_device(device, "out")?;
            if let Some(r) = &c.residual {
                r.check_on_device(device, "residual")?;
            }
            let vectors = c.x.cols / 8;
            let vectors_per_thread = vectors.div_ceil(MAX_THREADS);
            let threads = vectors.div_ceil(vectors_per_thread).div_ceil(32) * 32;
            let kernel = device.kernel(&SOURCE, &name_expr(vectors_per_thread, c.residual.is_some()))?;

            let mut x = c.x.ptr;
            let mut x_stride = c.x.row_stride as i64;
            let mut res = c.residual.map_or(0, |r| r.ptr);
            let mut res_stride = c.residual.map_or(0, |r| r.row_stride as i64);
            let mut w = c.weight.ptr;
            let mut out = c.out.ptr;
            let mut out_stride = c.out.row_stride as i64;
            let mut dim = c.x.cols as i32;
            let mut eps = a.eps;
            let mut w_offset = a.style.offset();
            let mut args = crate::kernel_args![x, x_stride, res, res_stride, w, out, out_stride, dim, eps, w_offset];
            unsafe {
                device.launch_dependent(
                    &kernel,
                    (c.x.rows as u32, 1, 1),
                    (threads as u32, 1, 1),
                    0,
                    stream.raw(),
                    &mut args,
                )
            }
        }
    }
}
