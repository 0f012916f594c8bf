//! Op-level correctness checks on fresh random inputs: each op runs on the context's backend with its
//! output poisoned first, and is compared with the oracle: `reference` for a CUDA context, the independent
//! f64 formulas of [`crate::testing::naive`] for the CPU backend. Used by `sparkinfer check` and the GPU
//! tests.

use crate::error::Result;
use crate::ops::{gemv, rmsnorm, Backend, Context, Stream};
use crate::reference::{self, bf16, rmsnorm::WeightStyle};
use crate::testing::{Comparison, Rng, TestBuffer};

fn f32s(v: &[bf16]) -> Vec<f32> {
    reference::to_f32(v)
}

/// Elements of a strided `[rows, stride]` matrix that lie in the padding (columns ≥ cols) and no longer
/// hold the 0xFFFF poison pattern: a kernel wrote outside its output.
fn padding_writes(data: &[u16], rows: usize, cols: usize, stride: usize) -> usize {
    (0..rows).flat_map(|r| (cols..stride).map(move |c| r * stride + c)).filter(|&i| data[i] != 0xffff).count()
}

fn dense_rows(data: &[bf16], rows: usize, cols: usize, stride: usize) -> Vec<bf16> {
    (0..rows).flat_map(|r| data[r * stride..r * stride + cols].iter().copied()).collect()
}

#[derive(Clone, Copy, Debug)]
pub struct RmsNormCase {
    pub rows: usize,
    pub dim: usize,
    pub style: WeightStyle,
    pub residual: bool,
    /// Extra elements per row beyond `dim` in every matrix (exercises strides; must keep 8-alignment).
    pub pad: usize,
    /// Write the output over x.
    pub in_place: bool,
}

#[derive(Clone, Copy, Debug)]
pub struct CheckResult {
    pub out: Comparison,
    /// The residual written back, when the case has one.
    pub residual: Option<Comparison>,
    /// Elements written outside the outputs' rows.
    pub stray_writes: usize,
}

impl CheckResult {
    pub fn passes(&self, tol: f64) -> bool {
        self.out.passes(tol) && self.residual.is_none_or(|r| r.passes(tol)) && self.stray_writes == 0
    }
}

pub fn check_rmsnorm(ctx: &Context, stream: Stream, c: &RmsNormCase, seed: u64) -> Result<CheckResult> {
    let mut rng = Rng::new(seed);
    let stride = c.dim + c.pad;
    let x = rng.bf16_normal(c.rows * stride, 1.0);
    let res = rng.bf16_normal(c.rows * stride, 1.0);
    let w: Vec<bf16> = match c.style {
        WeightStyle::Plain => (0..c.dim).map(|_| bf16::from_f32(1.0 + 0.5 * rng.normal())).collect(),
        WeightStyle::OffsetOne => rng.bf16_normal(c.dim, 0.5),
    };
    let eps = 1e-6f32;

    let x_buf = TestBuffer::from_slice(ctx, &x)?;
    let res_buf = TestBuffer::from_slice(ctx, &res)?;
    let w_buf = TestBuffer::from_slice(ctx, &w)?;
    let out_buf = TestBuffer::new(ctx, c.rows * stride * 2)?;
    out_buf.poison()?;
    let out_ptr = if c.in_place { x_buf.ptr() } else { out_buf.ptr() };
    let args = rmsnorm::RmsNormArgs {
        x: x_buf.ptr(),
        x_row_stride: stride as i64,
        residual: if c.residual { res_buf.ptr() } else { 0 },
        residual_row_stride: stride as i64,
        weight: w_buf.ptr(),
        out: out_ptr,
        out_row_stride: stride as i64,
        rows: c.rows as i64,
        dim: c.dim as i64,
        eps,
        style: c.style,
    };
    // Every address is a buffer allocated above with the extent the arguments describe.
    unsafe { rmsnorm::rmsnorm(ctx, &args, stream)? };
    stream.synchronize(ctx)?;

    let out_raw: Vec<u16> = if c.in_place { x_buf.download(x.len())? } else { out_buf.download(x.len())? };
    let stray_writes = if c.in_place { 0 } else { padding_writes(&out_raw, c.rows, c.dim, stride) };
    let out: Vec<bf16> =
        dense_rows(&out_raw.iter().map(|&b| bf16::from_bits(b)).collect::<Vec<_>>(), c.rows, c.dim, stride);
    let res_out: Vec<bf16> = dense_rows(&res_buf.download::<bf16>(res.len())?, c.rows, c.dim, stride);

    let x_dense = dense_rows(&x, c.rows, c.dim, stride);
    let mut res_dense = dense_rows(&res, c.rows, c.dim, stride);
    let (want_out, want_res): (Vec<f32>, Vec<f32>) = match ctx.backend() {
        Backend::Cuda(_) => {
            let mut want = vec![bf16::ZERO; x_dense.len()];
            reference::rmsnorm::rmsnorm(
                &x_dense,
                c.residual.then_some(&mut res_dense[..]),
                &w,
                &mut want,
                c.dim,
                eps,
                c.style,
            );
            (f32s(&want), f32s(&res_dense))
        }
        Backend::Cpu => {
            let wf: Vec<f64> = w.iter().map(|v| v.to_f64()).collect();
            let mut want = Vec::with_capacity(x_dense.len());
            let mut want_res = Vec::with_capacity(x_dense.len());
            for r in 0..c.rows {
                let row: Vec<f64> = (0..c.dim)
                    .map(|i| {
                        let xv = x_dense[r * c.dim + i].to_f64();
                        if c.residual {
                            // The residual sum is defined as rounded to bf16 before the norm.
                            bf16::from_f64(xv + res_dense[r * c.dim + i].to_f64()).to_f64()
                        } else {
                            xv
                        }
                    })
                    .collect();
                want_res.extend(row.iter().map(|&v| v as f32));
                want.extend(
                    crate::testing::naive::rmsnorm_row(&row, &wf, eps as f64, c.style.offset() as f64)
                        .iter()
                        .map(|&v| v as f32),
                );
            }
            (want, if c.residual { want_res } else { f32s(&res_dense) })
        }
    };
    Ok(CheckResult {
        out: Comparison::new(&f32s(&out), &want_out),
        residual: c.residual.then(|| Comparison::new(&f32s(&res_out), &want_res)),
        stray_writes,
    })
}

#[derive(Clone, Copy, Debug)]
pub struct GemvCase {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub out_type: gemv::OutType,
    /// Extra elements per row of x, W and y (x and W pads keep 8-alignment).
    pub pad: usize,
}

pub fn check_gemv(ctx: &Context, stream: Stream, c: &GemvCase, seed: u64) -> Result<CheckResult> {
    let mut rng = Rng::new(seed);
    let (xs, ws, ys) = (c.k + c.pad, c.k + c.pad, c.n + c.pad);
    let x = rng.bf16_normal(c.m * xs, 1.0);
    let w = rng.bf16_normal(c.n * ws, 1.0 / (c.k as f32).sqrt());
    let x_buf = TestBuffer::from_slice(ctx, &x)?;
    let w_buf = TestBuffer::from_slice(ctx, &w)?;
    let elem = c.out_type.bytes();
    let y_buf = TestBuffer::new(ctx, c.m * ys * elem)?;
    y_buf.poison()?;
    let args = gemv::GemvArgs {
        x: x_buf.ptr(),
        x_row_stride: xs as i64,
        w: w_buf.ptr(),
        w_row_stride: ws as i64,
        y: y_buf.ptr(),
        y_row_stride: ys as i64,
        m: c.m as i64,
        n: c.n as i64,
        k: c.k as i64,
        out_type: c.out_type,
    };
    // Every address is a buffer allocated above with the extent the arguments describe.
    unsafe { gemv::gemv(ctx, &args, stream)? };
    stream.synchronize(ctx)?;

    let (y, stray_writes): (Vec<f32>, usize) = match c.out_type {
        gemv::OutType::F32 => {
            let raw: Vec<u32> = y_buf.download(c.m * ys)?;
            let stray =
                (0..c.m).flat_map(|r| (c.n..ys).map(move |j| r * ys + j)).filter(|&i| raw[i] != u32::MAX).count();
            let y = (0..c.m).flat_map(|r| raw[r * ys..r * ys + c.n].iter().map(|&b| f32::from_bits(b))).collect();
            (y, stray)
        }
        gemv::OutType::Bf16 => {
            let raw: Vec<u16> = y_buf.download(c.m * ys)?;
            let stray = padding_writes(&raw, c.m, c.n, ys);
            let y =
                (0..c.m).flat_map(|r| raw[r * ys..r * ys + c.n].iter().map(|&b| bf16::from_bits(b).to_f32())).collect();
            (y, stray)
        }
    };
    let x_dense = dense_rows(&x, c.m, c.k, xs);
    let w_dense = dense_rows(&w, c.n, c.k, ws);
    let want: Vec<f32> = match ctx.backend() {
        Backend::Cuda(_) => reference::gemv::gemv(&x_dense, &w_dense, c.m, c.n, c.k),
        Backend::Cpu => {
            let xf: Vec<f64> = x_dense.iter().map(|v| v.to_f64()).collect();
            let wf: Vec<f64> = w_dense.iter().map(|v| v.to_f64()).collect();
            crate::testing::naive::matmul_nt(&xf, &wf, c.m, c.n, c.k).iter().map(|&v| v as f32).collect()
        }
    };
    Ok(CheckResult { out: Comparison::new(&y, &want), residual: None, stray_writes })
}
