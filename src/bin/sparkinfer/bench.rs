//! `sparkinfer bench`: the GPU rows of `sparkinfer::bench`, or a few CPU-backend timings without a GPU.

use crate::check::stream_for;
use crate::Options;
use sparkinfer::bench::{self, median, Bench, Row};
use sparkinfer::ops::gemv::{self, GemvArgs, OutType};
use sparkinfer::ops::rmsnorm;
use sparkinfer::ops::{Backend, Context, Stream};
use sparkinfer::reference::rmsnorm::WeightStyle;
use sparkinfer::testing::{Rng, TestBuffer};
use std::fmt::Write as _;
use std::time::Instant;

type R<T> = Result<T, String>;

fn s<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

fn time_cpu(reps: usize, mut f: impl FnMut() -> sparkinfer::Result<()>) -> R<f64> {
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f().map_err(s)?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(median(times))
}

fn cpu_rows(ctx: &Context, o: &Options) -> R<Vec<Row>> {
    let mut rng = Rng::new(o.seed.unwrap_or(7));
    let reps = if o.quick { 3 } else { 10 };
    let mut rows = Vec::new();
    for &(m, n, k) in &[(1usize, 2048usize, 2048usize), (1, 8192, 2048)] {
        let x = TestBuffer::from_slice(ctx, &rng.bf16_normal(m * k, 1.0)).map_err(s)?;
        let w = TestBuffer::from_slice(ctx, &rng.bf16_normal(n * k, 1.0)).map_err(s)?;
        let y = TestBuffer::new(ctx, m * n * 2).map_err(s)?;
        let args = GemvArgs {
            x: x.ptr(),
            x_row_stride: 0,
            w: w.ptr(),
            w_row_stride: 0,
            y: y.ptr(),
            y_row_stride: 0,
            m: m as i64,
            n: n as i64,
            k: k as i64,
            out_type: OutType::Bf16,
            weights_static: false,
        };
        let us = time_cpu(reps, || unsafe { gemv::gemv(ctx, &args, Stream::NULL) })?;
        rows.push(Row {
            op: "gemv".into(),
            shape: format!("M={m} {n}x{k} Bf16"),
            us,
            bytes: ((n * k + m * k + m * n) * 2) as f64,
        });
    }
    for &(r, dim) in &[(1usize, 2048usize), (64, 2048)] {
        let x = TestBuffer::from_slice(ctx, &rng.bf16_normal(r * dim, 1.0)).map_err(s)?;
        let res = TestBuffer::from_slice(ctx, &rng.bf16_normal(r * dim, 1.0)).map_err(s)?;
        let w = TestBuffer::from_slice(ctx, &rng.bf16_normal(dim, 1.0)).map_err(s)?;
        let out = TestBuffer::new(ctx, r * dim * 2).map_err(s)?;
        let args =
            bench::foundation::rmsnorm_args(x.ptr(), res.ptr(), w.ptr(), out.ptr(), r, dim, WeightStyle::OffsetOne);
        let us = time_cpu(reps, || unsafe { rmsnorm::rmsnorm(ctx, &args, Stream::NULL) })?;
        rows.push(Row {
            op: "rmsnorm".into(),
            shape: format!("{r}x{dim} +residual"),
            us,
            bytes: (r * dim * 8 + dim * 2) as f64,
        });
    }
    Ok(rows)
}

fn json(device: &str, copy_gbps: f64, rows: &[Row], extra: &[(String, f64)]) -> String {
    let pct = |r: &Row| if copy_gbps > 0.0 { 100.0 * r.gbps() / copy_gbps } else { 0.0 };
    let floor = |r: &Row| if copy_gbps > 0.0 { r.bytes / copy_gbps / 1e3 } else { 0.0 };
    let mut j = String::new();
    let _ = writeln!(j, "{{\n  \"device\": {device:?},\n  \"version\": {:?},", sparkinfer::VERSION);
    let _ = writeln!(j, "  \"copy_bandwidth_gbps\": {copy_gbps:.1},\n  \"rows\": [");
    for (i, r) in rows.iter().enumerate() {
        let _ = writeln!(
            j,
            "    {{\"op\": {:?}, \"shape\": {:?}, \"us\": {:.3}, \"bytes\": {:.0}, \"gbps\": {:.1}, \"pct_copy\": {:.1}, \"floor_us\": {:.3}}}{}",
            r.op,
            r.shape,
            r.us,
            r.bytes,
            r.gbps(),
            pct(r),
            floor(r),
            if i + 1 < rows.len() { "," } else { "" }
        );
    }
    j.push_str("  ],\n  \"extra_us\": {");
    for (i, (k, v)) in extra.iter().enumerate() {
        let _ = write!(j, "{}\n    {k:?}: {v:.3}", if i > 0 { "," } else { "" });
    }
    j.push_str("\n  }\n}\n");
    j
}

pub fn run(o: &Options) -> R<()> {
    let ctx = crate::open_context(o)?;
    let (device_name, rows, copy_gbps, extra) = match ctx.backend() {
        Backend::Cuda(device) => {
            let owner = stream_for(&ctx)?;
            let stream = owner.stream();
            let copy = bench::copy_bandwidth(device, stream).map_err(s)?;
            eprintln!("copy bandwidth: {copy:.0} GB/s");
            let iters = if o.quick { 50 } else { 200 };
            let mut b = Bench { ctx: &ctx, device, stream, iters, rng: Rng::new(o.seed.unwrap_or(7)) };
            let rows = bench::family_rows(&mut b, &o.only).map_err(s)?;
            let extra = if o.only.is_empty() || o.only.iter().any(|f| f == "foundation") {
                bench::extra_figures(&mut b).map_err(s)?
            } else {
                Vec::new()
            };
            let name = format!("{} ({}, {} SMs)", device.info.name, device.info.arch(), device.info.sm_count);
            (name, rows, copy, extra)
        }
        Backend::Cpu => ("CPU backend".to_string(), cpu_rows(&ctx, o)?, 0.0, Vec::new()),
    };
    println!("sparkinfer bench on {device_name}");
    if copy_gbps > 0.0 {
        println!("measured copy bandwidth: {copy_gbps:.0} GB/s (read + write)");
    }
    println!("{:<10} {:<34} {:>10} {:>9} {:>8} {:>10}", "op", "shape", "µs", "GB/s", "% copy", "floor µs");
    for r in &rows {
        let (pct, floor) = if copy_gbps > 0.0 {
            (format!("{:.1}", 100.0 * r.gbps() / copy_gbps), format!("{:.2}", r.bytes / copy_gbps / 1e3))
        } else {
            ("-".into(), "-".into())
        };
        println!("{:<10} {:<34} {:>10.2} {:>9.1} {:>8} {:>10}", r.op, r.shape, r.us, r.gbps(), pct, floor);
    }
    for (k, v) in &extra {
        println!("{k}: {v:.2} µs");
    }
    if let Some(path) = &o.json {
        std::fs::write(path, json(&device_name, copy_gbps, &rows, &extra))
            .map_err(|e| format!("--json {path}: {e}"))?;
        eprintln!("wrote {path}");
    }
    Ok(())
}
