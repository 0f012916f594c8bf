//! Checks of RMSNorm and GEMV.

use super::{dense_rows, f32s, padding_writes, CheckResult, ModelCheck};
use crate::error::Result;
use crate::ops::{gemv, rmsnorm, Backend, Context, Stream};
use crate::reference::{self, bf16, rmsnorm::WeightStyle};
use crate::testing::{Comparison, Rng, TestBuffer, BF16_TOL, F32_TOL};

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
    pub weights_static: bool,
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
        weights_static: c.weights_static,
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

/// (label, rows, dim, style): hidden states and per-head q/k norms of Qwen3.5-35B-A3B and Gemma 4 26B-A4B.
const RMSNORM_SHAPES: &[(&str, usize, usize, WeightStyle)] = &[
    ("qwen3.5 hidden", 1, 2048, WeightStyle::OffsetOne),
    ("qwen3.5 hidden", 64, 2048, WeightStyle::OffsetOne),
    ("qwen3.5 q-norm (16 heads x 256)", 16, 256, WeightStyle::OffsetOne),
    ("gemma4 hidden", 1, 2816, WeightStyle::Plain),
    ("gemma4 hidden", 7, 2816, WeightStyle::Plain),
    ("gemma4 global q-norm (hd 512)", 16, 512, WeightStyle::Plain),
    ("largest dim", 3, 16384, WeightStyle::Plain),
];

/// (label, n, k, out): projections of the two models at decode.
const GEMV_SHAPES: &[(&str, usize, usize, gemv::OutType)] = &[
    ("qwen3.5 router 256x2048", 256, 2048, gemv::OutType::F32),
    ("qwen3.5 q+gate 8192x2048", 8192, 2048, gemv::OutType::Bf16),
    ("qwen3.5 o_proj 2048x4096", 2048, 4096, gemv::OutType::Bf16),
    ("lm-head slice 31040x2048", 31040, 2048, gemv::OutType::Bf16),
    ("gemma4 router 128x2816", 128, 2816, gemv::OutType::F32),
    ("gemma4 q_proj 4096x2816", 4096, 2816, gemv::OutType::Bf16),
    ("gemma4 dense up 2112x2816", 2112, 2816, gemv::OutType::Bf16),
];

pub fn model_checks(cpu: bool) -> Vec<ModelCheck> {
    let mut checks = Vec::new();
    for &(label, rows, dim, style) in RMSNORM_SHAPES {
        for residual in [false, true] {
            let case = RmsNormCase { rows, dim, style, residual, pad: 0, in_place: false };
            checks.push(ModelCheck {
                op: "rmsnorm",
                shape: format!("{label} [{rows}x{dim}]"),
                variant: format!("{style:?}{}", if residual { "+residual" } else { "" }),
                tol: BF16_TOL,
                run: Box::new(move |ctx, stream, seed| check_rmsnorm(ctx, stream, &case, seed)),
            });
        }
    }
    let ms: &[usize] = if cpu { &[1, 3] } else { &[1, 2, 7, 16] };
    for &(label, n, k, out_type) in GEMV_SHAPES {
        for &m in ms {
            let case = GemvCase { m, n, k, out_type, weights_static: m == 1, pad: 0 };
            checks.push(ModelCheck {
                op: "gemv",
                shape: label.to_string(),
                variant: format!("M={m} {out_type:?} out"),
                tol: if out_type == gemv::OutType::F32 { F32_TOL } else { BF16_TOL },
                run: Box::new(move |ctx, stream, seed| check_gemv(ctx, stream, &case, seed)),
            });
        }
    }
    checks
}
