//! The ops of the C API: a params struct each, checked and handed to `ops`.

use super::context::{context_ref, sparkinfer_context, sparkinfer_stream};
use super::{guard, sparkinfer_status};
use crate::error::{Error, Result};
use crate::ops::{gemv, rmsnorm, Stream};
use crate::reference::rmsnorm::WeightStyle;
use std::ffi::c_void;

/// `out = x̂ · w` (Gemma 4 style).
pub const SPARKINFER_WEIGHT_STYLE_PLAIN: i32 = 0;
/// `out = x̂ · (1 + w)` (Qwen3.5 style).
pub const SPARKINFER_WEIGHT_STYLE_OFFSET_ONE: i32 = 1;

/// bf16 (bfloat16) elements.
pub const SPARKINFER_DTYPE_BF16: i32 = 0;
/// fp32 elements.
pub const SPARKINFER_DTYPE_F32: i32 = 1;

/// RMSNorm over `rows` rows of `dim` bf16 values, with an optional fused residual add:
///
/// - without residual: `out = x · rsqrt(mean(x²) + eps) · w'`
/// - with residual: `r' = bf16(x + residual)`, written back into `residual`, then
///   `out = r' · rsqrt(mean(r'²) + eps) · w'`
///
/// where `w' = w` (SPARKINFER_WEIGHT_STYLE_PLAIN) or `1 + w` (SPARKINFER_WEIGHT_STYLE_OFFSET_ONE). fp32
/// arithmetic, one rounding to bf16. Row strides are in elements, 0 meaning `dim`; they and `dim` must be
/// multiples of 8 and every pointer 16-byte aligned. `out` may equal `x` or `residual` (in place).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct sparkinfer_rmsnorm_params {
    /// bf16 [rows, dim].
    pub x: *const c_void,
    pub x_row_stride: i64,
    /// bf16 [rows, dim], read and overwritten with x + residual; NULL for none.
    pub residual: *mut c_void,
    pub residual_row_stride: i64,
    /// bf16 [dim].
    pub weight: *const c_void,
    /// bf16 [rows, dim].
    pub out: *mut c_void,
    pub out_row_stride: i64,
    /// 1 to 2^31 − 1.
    pub rows: i64,
    /// Multiple of 8, at most 16384.
    pub dim: i64,
    /// Added to the mean square; finite, ≥ 0 (1e-6 for both target models).
    pub eps: f32,
    /// SPARKINFER_WEIGHT_STYLE_PLAIN or SPARKINFER_WEIGHT_STYLE_OFFSET_ONE.
    pub weight_style: i32,
}

/// GEMV flag: the weights are not written by the kernel that immediately precedes the call on the stream
/// (true of model weights during decode), so the kernel may start streaming them while that kernel is
/// still finishing (programmatic dependent launch, sm_90 and newer). x and y keep full stream order.
pub const SPARKINFER_GEMV_WEIGHTS_STATIC: i32 = 1;

/// `y[m, n] = Σ_k x[m, k] · w[n, k]` (GEMV for decode, skinny GEMM up to 16 rows): bf16 inputs, fp32
/// accumulation, bf16 or fp32 output. Row strides in elements, 0 meaning dense; `k`, `n` and the strides of
/// `x` and `w` must be multiples of 8, `x` and `w` 16-byte aligned.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct sparkinfer_gemv_params {
    /// bf16 [m, k].
    pub x: *const c_void,
    pub x_row_stride: i64,
    /// bf16 [n, k] (a PyTorch Linear weight).
    pub w: *const c_void,
    pub w_row_stride: i64,
    /// [m, n] of `y_dtype`.
    pub y: *mut c_void,
    pub y_row_stride: i64,
    /// 1 to 16.
    pub m: i64,
    pub n: i64,
    pub k: i64,
    /// SPARKINFER_DTYPE_BF16 or SPARKINFER_DTYPE_F32.
    pub y_dtype: i32,
    /// 0 or SPARKINFER_GEMV_WEIGHTS_STATIC.
    pub flags: i32,
}

fn params_ref<'a, T>(params: *const T) -> Result<&'a T> {
    if params.is_null() {
        return Err(Error::invalid("params: NULL pointer"));
    }
    Ok(unsafe { &*params })
}

/// Runs RMSNorm (see sparkinfer_rmsnorm_params) on `stream` (NULL on the CPU backend).
#[no_mangle]
pub extern "C" fn sparkinfer_rmsnorm(
    ctx: *const sparkinfer_context,
    params: *const sparkinfer_rmsnorm_params,
    stream: sparkinfer_stream,
) -> sparkinfer_status {
    guard(|| {
        let ctx = context_ref(ctx)?;
        let p = params_ref(params)?;
        let style = match p.weight_style {
            SPARKINFER_WEIGHT_STYLE_PLAIN => WeightStyle::Plain,
            SPARKINFER_WEIGHT_STYLE_OFFSET_ONE => WeightStyle::OffsetOne,
            other => return Err(Error::invalid(format!("weight_style: unknown value {other}"))),
        };
        let args = rmsnorm::RmsNormArgs {
            x: p.x as u64,
            x_row_stride: p.x_row_stride,
            residual: p.residual as u64,
            residual_row_stride: p.residual_row_stride,
            weight: p.weight as u64,
            out: p.out as u64,
            out_row_stride: p.out_row_stride,
            rows: p.rows,
            dim: p.dim,
            eps: p.eps,
            style,
        };
        // The caller guarantees the stream and the pointers (header contract); shapes are checked inside.
        unsafe { rmsnorm::rmsnorm(ctx, &args, Stream::from_raw(stream)) }
    })
}

/// Runs GEMV (see sparkinfer_gemv_params) on `stream` (NULL on the CPU backend).
#[no_mangle]
pub extern "C" fn sparkinfer_gemv(
    ctx: *const sparkinfer_context,
    params: *const sparkinfer_gemv_params,
    stream: sparkinfer_stream,
) -> sparkinfer_status {
    guard(|| {
        let ctx = context_ref(ctx)?;
        let p = params_ref(params)?;
        let out_type = match p.y_dtype {
            SPARKINFER_DTYPE_BF16 => gemv::OutType::Bf16,
            SPARKINFER_DTYPE_F32 => gemv::OutType::F32,
            other => return Err(Error::invalid(format!("y_dtype: unknown value {other}"))),
        };
        if p.flags & !SPARKINFER_GEMV_WEIGHTS_STATIC != 0 {
            return Err(Error::invalid(format!(
                "flags: unknown bits {:#x}",
                p.flags & !SPARKINFER_GEMV_WEIGHTS_STATIC
            )));
        }
        let args = gemv::GemvArgs {
            x: p.x as u64,
            x_row_stride: p.x_row_stride,
            w: p.w as u64,
            w_row_stride: p.w_row_stride,
            y: p.y as u64,
            y_row_stride: p.y_row_stride,
            m: p.m,
            n: p.n,
            k: p.k,
            out_type,
            weights_static: p.flags & SPARKINFER_GEMV_WEIGHTS_STATIC != 0,
        };
        unsafe { gemv::gemv(ctx, &args, Stream::from_raw(stream)) }
    })
}
