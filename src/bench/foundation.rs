//! Rows for GEMV and RMSNorm, and the launch-overhead figures.

use super::{copies_for, time_isolated, time_launches, Bench, Rotating, Row};
use crate::error::Result;
use crate::ops::gemv::{self, GemvArgs, OutType};
use crate::ops::rmsnorm::{self, RmsNormArgs};
use crate::reference::rmsnorm::WeightStyle;

/// (m, n, k, out, weights_static): the decode shapes, the routers, a Gemma 4 projection and
/// skinny batches; the decode shapes again with the weights-static promise.
const GEMV_SHAPES: &[(usize, usize, usize, OutType, bool)] = &[
    (1, 2048, 2048, OutType::Bf16, false),
    (1, 8192, 2048, OutType::Bf16, false),
    (1, 31040, 2048, OutType::Bf16, false),
    (1, 256, 2048, OutType::F32, false),
    (1, 4096, 2816, OutType::Bf16, false),
    (4, 8192, 2048, OutType::Bf16, false),
    (16, 8192, 2048, OutType::Bf16, false),
    (1, 2048, 2048, OutType::Bf16, true),
    (1, 8192, 2048, OutType::Bf16, true),
    (1, 31040, 2048, OutType::Bf16, true),
    (1, 4096, 2816, OutType::Bf16, true),
];

/// (rows, dim, residual).
const RMSNORM_SHAPES: &[(usize, usize, bool)] =
    &[(1, 2048, false), (1, 2048, true), (64, 2048, true), (1, 2816, true), (64, 2816, true)];

pub fn rmsnorm_args(
    x: u64,
    residual: u64,
    w: u64,
    out: u64,
    rows: usize,
    dim: usize,
    style: WeightStyle,
) -> RmsNormArgs {
    RmsNormArgs {
        x,
        x_row_stride: 0,
        residual,
        residual_row_stride: 0,
        weight: w,
        out,
        out_row_stride: 0,
        rows: rows as i64,
        dim: dim as i64,
        eps: 1e-6,
        style,
    }
}

fn gemv_row(b: &mut Bench, m: usize, n: usize, k: usize, out: OutType, weights_static: bool) -> Result<Row> {
    let set_bytes = (n * k + m * k) * 2 + m * n * out.bytes();
    let copies = copies_for(b.device, set_bytes);
    let w = Rotating::bf16(b.device, n * k, copies, &mut b.rng)?;
    let x = Rotating::bf16(b.device, m * k, copies, &mut b.rng)?;
    let y = Rotating::output(b.device, m * n * out.bytes(), copies)?;
    let stream = b.stream;
    let ctx = b.ctx;
    let us = time_launches(b.device, b.stream, b.iters, |i| {
        let args = GemvArgs {
            x: x.ptr(i),
            x_row_stride: 0,
            w: w.ptr(i),
            w_row_stride: 0,
            y: y.ptr(i),
            y_row_stride: 0,
            m: m as i64,
            n: n as i64,
            k: k as i64,
            out_type: out,
            weights_static,
        };
        // Buffers above hold every copy's full extent.
        unsafe { gemv::gemv(ctx, &args, stream) }
    })?;
    let flag = if weights_static { " static-W" } else { "" };
    Ok(Row { op: "gemv".into(), shape: format!("M={m} {n}x{k} {out:?}{flag}"), us, bytes: set_bytes as f64 })
}

fn rmsnorm_row(b: &mut Bench, rows: usize, dim: usize, residual: bool) -> Result<Row> {
    let elems = rows * dim;
    let set_bytes = elems * 2 * if residual { 4 } else { 2 } + dim * 2;
    let copies = copies_for(b.device, set_bytes);
    let x = Rotating::bf16(b.device, elems, copies, &mut b.rng)?;
    let r = Rotating::bf16(b.device, elems, copies, &mut b.rng)?;
    let w = Rotating::bf16(b.device, dim, 1, &mut b.rng)?;
    let out = Rotating::output(b.device, elems * 2, copies)?;
    let stream = b.stream;
    let ctx = b.ctx;
    let us = time_launches(b.device, b.stream, b.iters, |i| {
        let res = if residual { r.ptr(i) } else { 0 };
        let args = rmsnorm_args(x.ptr(i), res, w.ptr(0), out.ptr(i), rows, dim, WeightStyle::OffsetOne);
        unsafe { rmsnorm::rmsnorm(ctx, &args, stream) }
    })?;
    let shape = format!("{rows}x{dim}{}", if residual { " +residual" } else { "" });
    Ok(Row { op: "rmsnorm".into(), shape, us, bytes: set_bytes as f64 })
}

pub fn rows(b: &mut Bench) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &(m, n, k, out, weights_static) in GEMV_SHAPES {
        rows.push(gemv_row(b, m, n, k, out, weights_static)?);
    }
    for &(r, dim, residual) in RMSNORM_SHAPES {
        rows.push(rmsnorm_row(b, r, dim, residual)?);
    }
    Ok(rows)
}

/// Host µs per launch call (kernel cached); device µs of a lone launch (event pair, launch latency
/// included) for the small RMSNorm and a mid-size GEMV, beside their in-graph rows.
pub fn launch_overhead(b: &mut Bench) -> Result<Vec<(String, f64)>> {
    let (rows, dim) = (1usize, 2048usize);
    let x = Rotating::bf16(b.device, rows * dim, 1, &mut b.rng)?;
    let w = Rotating::bf16(b.device, dim, 1, &mut b.rng)?;
    let out = Rotating::output(b.device, rows * dim * 2, 1)?;
    let args = rmsnorm_args(x.ptr(0), 0, w.ptr(0), out.ptr(0), rows, dim, WeightStyle::Plain);
    let stream = b.stream;
    unsafe { rmsnorm::rmsnorm(b.ctx, &args, stream)? };
    stream.synchronize(b.ctx)?;
    let calls = 500;
    let started = std::time::Instant::now();
    for _ in 0..calls {
        unsafe { rmsnorm::rmsnorm(b.ctx, &args, stream)? };
    }
    let host_us = started.elapsed().as_secs_f64() * 1e6 / calls as f64;
    stream.synchronize(b.ctx)?;
    let lone_rmsnorm = time_isolated(b.device, stream, b.iters, |_| unsafe { rmsnorm::rmsnorm(b.ctx, &args, stream) })?;

    let (n, k) = (8192usize, 2048usize);
    let copies = copies_for(b.device, n * k * 2);
    let wg = Rotating::bf16(b.device, n * k, copies, &mut b.rng)?;
    let xg = Rotating::bf16(b.device, k, copies, &mut b.rng)?;
    let yg = Rotating::output(b.device, n * 2, copies)?;
    let ctx = b.ctx;
    let lone_gemv = time_isolated(b.device, stream, b.iters, |i| {
        let args = GemvArgs {
            x: xg.ptr(i),
            x_row_stride: 0,
            w: wg.ptr(i),
            w_row_stride: 0,
            y: yg.ptr(i),
            y_row_stride: 0,
            m: 1,
            n: n as i64,
            k: k as i64,
            out_type: OutType::Bf16,
            weights_static: false,
        };
        unsafe { gemv::gemv(ctx, &args, stream) }
    })?;
    Ok(vec![
        ("launch host time per call, rmsnorm 1x2048".to_string(), host_us),
        ("lone launch device time, rmsnorm 1x2048".to_string(), lone_rmsnorm),
        ("lone launch device time, gemv M=1 8192x2048".to_string(), lone_gemv),
    ])
}
