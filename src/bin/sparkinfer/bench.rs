//! `sparkinfer bench`: each op at the model shapes.
//!
//! On a GPU: the device's copy bandwidth is measured first; each op is timed with a CUDA event pair per
//! launch (all launches queued back to back, read after one synchronisation), after a warm-up, taking the
//! median; inputs rotate through enough copies that the working set exceeds twice the L2. Rows print µs,
//! GB/s (bytes the op must move), the fraction of copy bandwidth and the byte floor. Launch overhead is
//! the host time of one launch call and the time per op replayed inside a CUDA graph.

use crate::check::stream_for;
use crate::Options;
use cudarc::driver::sys::{self, CUstream};
use sparkinfer::ops::gemv::{self, GemvArgs, OutType};
use sparkinfer::ops::rmsnorm::{self, RmsNormArgs};
use sparkinfer::ops::{Backend, Context, Stream};
use sparkinfer::reference::rmsnorm::WeightStyle;
use sparkinfer::runtime::buffer::{DeviceBuffer, EventTimer};
use sparkinfer::runtime::Device;
use sparkinfer::testing::{Rng, TestBuffer};
use std::fmt::Write as _;
use std::time::Instant;

/// What every timed row needs: the context, its stream, the run length and the bandwidth reference.
struct Bench<'a> {
    ctx: &'a Context,
    device: &'a Device,
    stream: CUstream,
    iters: usize,
    copy_gbps: f64,
    rng: Rng,
}

/// Timed rows, copy bandwidth, and named extra figures (launch overheads).
type GpuResults = (Vec<Row>, f64, Vec<(String, f64)>);

struct Row {
    op: String,
    shape: String,
    us: f64,
    bytes: f64,
    copy_gbps: f64,
}

impl Row {
    fn gbps(&self) -> f64 {
        self.bytes / self.us / 1e3
    }
    fn floor_us(&self) -> f64 {
        if self.copy_gbps > 0.0 {
            self.bytes / self.copy_gbps / 1e3
        } else {
            0.0
        }
    }
}

type R<T> = Result<T, String>;

fn s<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// `copies` copies of one random bf16 tensor of `elems` elements, each starting on a 256-byte boundary.
struct Rotating<'a> {
    buf: DeviceBuffer<'a>,
    pitch: usize,
    copies: usize,
}

impl<'a> Rotating<'a> {
    fn new(device: &'a Device, elems: usize, copies: usize, rng: &mut Rng) -> R<Self> {
        let pitch = (elems * 2).div_ceil(256) * 256;
        let buf = DeviceBuffer::new(device, pitch * copies).map_err(s)?;
        buf.upload(&rng.bf16_normal(elems, 1.0)).map_err(s)?;
        for c in 1..copies {
            unsafe { device.copy(buf.ptr() + (c * pitch) as u64, buf.ptr(), elems * 2) }.map_err(s)?;
        }
        Ok(Rotating { buf, pitch, copies })
    }
    fn ptr(&self, i: usize) -> u64 {
        self.buf.ptr() + ((i % self.copies) * self.pitch) as u64
    }
}

/// Copies needed for `bytes_per_set` so that the sets span at least twice the L2.
fn copies_for(device: &Device, bytes_per_set: usize) -> usize {
    (2 * device.info.l2_bytes as usize).div_ceil(bytes_per_set.max(1)).clamp(1, 4096) + 1
}

/// Median device time of `launch(i)` in µs.
fn time_launches(device: &Device, stream: CUstream, iters: usize, mut launch: impl FnMut(usize) -> R<()>) -> R<f64> {
    for i in 0..iters.min(20) {
        launch(i)?;
    }
    let timers: Vec<EventTimer> = (0..iters).map(|_| EventTimer::new(device)).collect::<Result<_, _>>().map_err(s)?;
    for (i, t) in timers.iter().enumerate() {
        unsafe { t.start(stream) }.map_err(s)?;
        launch(i)?;
        unsafe { t.stop(stream) }.map_err(s)?;
    }
    median(timers.iter().map(|t| t.elapsed_us()).collect::<Result<_, _>>().map_err(s)?).pipe(Ok)
}

trait Pipe: Sized {
    fn pipe<T>(self, f: impl FnOnce(Self) -> T) -> T {
        f(self)
    }
}
impl Pipe for f64 {}

/// Device-to-device copy bandwidth in GB/s, counting bytes read and written.
fn copy_bandwidth(device: &Device, stream: CUstream) -> R<f64> {
    let bytes = 1usize << 30;
    let a = DeviceBuffer::new(device, bytes).map_err(s)?;
    let b = DeviceBuffer::new(device, bytes).map_err(s)?;
    let us = time_launches(device, stream, 20, |_| {
        unsafe { sys::cuMemcpyDtoDAsync_v2(b.ptr(), a.ptr(), bytes, stream) }
            .result()
            .map_err(|e| format!("cuMemcpyDtoDAsync: {e:?}"))
    })?;
    Ok(2.0 * bytes as f64 / us / 1e3)
}

fn gemv_row(b: &mut Bench, m: usize, n: usize, k: usize, out: OutType) -> R<Row> {
    let (ctx, device, stream, iters, copy_gbps) = (b.ctx, b.device, b.stream, b.iters, b.copy_gbps);
    let rng = &mut b.rng;
    let set_bytes = (n * k + m * k) * 2 + m * n * out.bytes();
    let copies = copies_for(device, set_bytes);
    let w = Rotating::new(device, n * k, copies, rng)?;
    let x = Rotating::new(device, m * k, copies, rng)?;
    let y = DeviceBuffer::new(device, (m * n * out.bytes()).div_ceil(256) * 256 * copies).map_err(s)?;
    let y_pitch = (m * n * out.bytes()).div_ceil(256) * 256;
    let us = time_launches(device, stream, iters, |i| {
        let args = GemvArgs {
            x: x.ptr(i),
            x_row_stride: 0,
            w: w.ptr(i),
            w_row_stride: 0,
            y: y.ptr() + ((i % copies) * y_pitch) as u64,
            y_row_stride: 0,
            m: m as i64,
            n: n as i64,
            k: k as i64,
            out_type: out,
        };
        unsafe { gemv::gemv(ctx, &args, Stream::from_raw(stream)) }.map_err(s)
    })?;
    Ok(Row { op: "gemv".into(), shape: format!("M={m} {n}x{k} {out:?}"), us, bytes: set_bytes as f64, copy_gbps })
}

fn rmsnorm_args(x: u64, residual: u64, w: u64, out: u64, rows: usize, dim: usize, style: WeightStyle) -> RmsNormArgs {
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

fn rmsnorm_row(b: &mut Bench, rows: usize, dim: usize, residual: bool) -> R<Row> {
    let (ctx, device, stream, iters, copy_gbps) = (b.ctx, b.device, b.stream, b.iters, b.copy_gbps);
    let rng = &mut b.rng;
    let elems = rows * dim;
    let set_bytes = elems * 2 * if residual { 4 } else { 2 } + dim * 2;
    let copies = copies_for(device, set_bytes);
    let x = Rotating::new(device, elems, copies, rng)?;
    let r = Rotating::new(device, elems, copies, rng)?;
    let w = Rotating::new(device, dim, 1, rng)?;
    let out = Rotating::new(device, elems, copies, rng)?;
    let style = WeightStyle::OffsetOne;
    let us = time_launches(device, stream, iters, |i| {
        let args = rmsnorm_args(x.ptr(i), if residual { r.ptr(i) } else { 0 }, w.ptr(0), out.ptr(i), rows, dim, style);
        unsafe { rmsnorm::rmsnorm(ctx, &args, Stream::from_raw(stream)) }.map_err(s)
    })?;
    let shape = format!("{rows}x{dim}{}", if residual { " +residual" } else { "" });
    Ok(Row { op: "rmsnorm".into(), shape, us, bytes: set_bytes as f64, copy_gbps })
}

/// Host µs per launch call (kernel cached), and device µs per op replayed in a graph of 100 ops.
fn launch_overhead(ctx: &Context, device: &Device, stream: CUstream, rng: &mut Rng) -> R<(f64, f64)> {
    let (rows, dim) = (1usize, 2048usize);
    let x = Rotating::new(device, rows * dim, 1, rng)?;
    let w = Rotating::new(device, dim, 1, rng)?;
    let out = Rotating::new(device, rows * dim, 1, rng)?;
    let args = rmsnorm_args(x.ptr(0), 0, w.ptr(0), out.ptr(0), rows, dim, WeightStyle::Plain);
    unsafe { rmsnorm::rmsnorm(ctx, &args, Stream::from_raw(stream)) }.map_err(s)?;
    unsafe { device.stream_synchronize(stream) }.map_err(s)?;
    let calls = 500;
    let started = Instant::now();
    for _ in 0..calls {
        unsafe { rmsnorm::rmsnorm(ctx, &args, Stream::from_raw(stream)) }.map_err(s)?;
    }
    let host_us = started.elapsed().as_secs_f64() * 1e6 / calls as f64;
    unsafe { device.stream_synchronize(stream) }.map_err(s)?;

    let ops_per_graph = 100;
    unsafe { sparkinfer::runtime::graph::begin_capture(device, stream) }.map_err(s)?;
    for _ in 0..ops_per_graph {
        if let Err(e) = unsafe { rmsnorm::rmsnorm(ctx, &args, Stream::from_raw(stream)) } {
            let _ = unsafe { sparkinfer::runtime::graph::end_capture(device, stream) };
            return Err(e.to_string());
        }
    }
    let graph = unsafe { sparkinfer::runtime::graph::end_capture(device, stream) }.map_err(s)?;
    let us = time_launches(device, stream, 50, |_| unsafe { graph.launch(device, stream) }.map_err(s))?;
    Ok((host_us, us / ops_per_graph as f64))
}

fn gpu_bench(ctx: &Context, device: &Device, o: &Options) -> R<GpuResults> {
    let stream_owner = stream_for(ctx)?;
    let stream = stream_owner.stream().raw();
    let iters = if o.quick { 50 } else { 200 };
    let copy_gbps = copy_bandwidth(device, stream)?;
    let mut b = Bench { ctx, device, stream, iters, copy_gbps, rng: Rng::new(o.seed.unwrap_or(7)) };
    eprintln!("copy bandwidth: {copy_gbps:.0} GB/s");
    let mut rows = Vec::new();
    for &(m, n, k, out) in &[
        (1, 2048, 2048, OutType::Bf16),
        (1, 8192, 2048, OutType::Bf16),
        (1, 31040, 2048, OutType::Bf16),
        (1, 256, 2048, OutType::F32),
        (1, 4096, 2816, OutType::Bf16),
        (4, 8192, 2048, OutType::Bf16),
        (16, 8192, 2048, OutType::Bf16),
    ] {
        rows.push(gemv_row(&mut b, m, n, k, out)?);
    }
    for &(r, dim, residual) in &[(1, 2048, false), (1, 2048, true), (64, 2048, true), (1, 2816, true), (64, 2816, true)]
    {
        rows.push(rmsnorm_row(&mut b, r, dim, residual)?);
    }
    let (host_us, graph_us) = launch_overhead(ctx, device, stream, &mut b.rng)?;
    let extra = vec![
        ("launch_host_us_rmsnorm".to_string(), host_us),
        ("graph_replay_us_per_op_rmsnorm_1x2048".to_string(), graph_us),
    ];
    Ok((rows, copy_gbps, extra))
}

fn cpu_bench(ctx: &Context, o: &Options) -> R<Vec<Row>> {
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
        };
        let times: Vec<f64> = (0..reps)
            .map(|_| {
                let t = Instant::now();
                unsafe { gemv::gemv(ctx, &args, Stream::NULL) }.map(|_| t.elapsed().as_secs_f64() * 1e6)
            })
            .collect::<Result<_, _>>()
            .map_err(s)?;
        rows.push(Row {
            op: "gemv".into(),
            shape: format!("M={m} {n}x{k} Bf16"),
            us: median(times),
            bytes: ((n * k + m * k + m * n) * 2) as f64,
            copy_gbps: 0.0,
        });
    }
    for &(r, dim) in &[(1usize, 2048usize), (64, 2048)] {
        let x = TestBuffer::from_slice(ctx, &rng.bf16_normal(r * dim, 1.0)).map_err(s)?;
        let res = TestBuffer::from_slice(ctx, &rng.bf16_normal(r * dim, 1.0)).map_err(s)?;
        let w = TestBuffer::from_slice(ctx, &rng.bf16_normal(dim, 1.0)).map_err(s)?;
        let out = TestBuffer::new(ctx, r * dim * 2).map_err(s)?;
        let args = rmsnorm_args(x.ptr(), res.ptr(), w.ptr(), out.ptr(), r, dim, WeightStyle::OffsetOne);
        let times: Vec<f64> = (0..reps)
            .map(|_| {
                let t = Instant::now();
                unsafe { rmsnorm::rmsnorm(ctx, &args, Stream::NULL) }.map(|_| t.elapsed().as_secs_f64() * 1e6)
            })
            .collect::<Result<_, _>>()
            .map_err(s)?;
        rows.push(Row {
            op: "rmsnorm".into(),
            shape: format!("{r}x{dim} +residual"),
            us: median(times),
            bytes: (r * dim * 8 + dim * 2) as f64,
            copy_gbps: 0.0,
        });
    }
    Ok(rows)
}

fn json(device: &str, copy_gbps: f64, rows: &[Row], extra: &[(String, f64)]) -> String {
    let mut j = String::new();
    let _ = write!(j, "{{\n  \"device\": {device:?},\n  \"version\": {:?},\n  \"copy_bandwidth_gbps\": {copy_gbps:.1},\n  \"rows\": [\n", sparkinfer::VERSION);
    for (i, r) in rows.iter().enumerate() {
        let _ = writeln!(
            j,
            "    {{\"op\": {:?}, \"shape\": {:?}, \"us\": {:.3}, \"bytes\": {:.0}, \"gbps\": {:.1}, \"pct_copy\": {:.1}, \"floor_us\": {:.3}}}{}",
            r.op,
            r.shape,
            r.us,
            r.bytes,
            r.gbps(),
            if copy_gbps > 0.0 { 100.0 * r.gbps() / copy_gbps } else { 0.0 },
            r.floor_us(),
            if i + 1 < rows.len() { "," } else { "" }
        );
    }
    j.push_str("  ]");
    for (k, v) in extra {
        let _ = write!(j, ",\n  {k:?}: {v:.3}");
    }
    j.push_str("\n}\n");
    j
}

pub fn run(o: &Options) -> R<()> {
    let ctx = crate::open_context(o)?;
    let (device_name, rows, copy_gbps, extra) = match ctx.backend() {
        Backend::Cuda(device) => {
            let (rows, copy, extra) = gpu_bench(&ctx, device, o)?;
            (format!("{} ({}, {} SMs)", device.info.name, device.info.arch(), device.info.sm_count), rows, copy, extra)
        }
        Backend::Cpu => ("CPU backend".to_string(), cpu_bench(&ctx, o)?, 0.0, Vec::new()),
    };
    println!("sparkinfer bench on {device_name}");
    if copy_gbps > 0.0 {
        println!("measured copy bandwidth: {copy_gbps:.0} GB/s (read + write)");
    }
    println!("{:<8} {:<28} {:>10} {:>9} {:>8} {:>10}", "op", "shape", "µs", "GB/s", "% copy", "floor µs");
    for r in &rows {
        let pct = if copy_gbps > 0.0 { format!("{:.1}", 100.0 * r.gbps() / copy_gbps) } else { "-".into() };
        let floor = if copy_gbps > 0.0 { format!("{:.2}", r.floor_us()) } else { "-".into() };
        println!("{:<8} {:<28} {:>10.2} {:>9.1} {:>8} {:>10}", r.op, r.shape, r.us, r.gbps(), pct, floor);
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
