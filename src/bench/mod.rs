//! GPU benchmark machinery behind `sparkinfer bench`: rotating input copies, CUDA-event timing, the copy
//! bandwidth reference, and one module of timed rows per kernel family.
//!
//! Method (DESIGN.md, Benchmarks): warm-up first; then the launches are captured into a CUDA graph, as an
//! engine runs its decode step, and the median replay time (CUDA events) divided by the launch count is
//! the time per op; inputs rotate through enough copies that the working set is at least twice the L2.
//! `time_isolated` gives the time of a lone launch, launch latency included.

pub mod attention;
pub mod foundation;
pub mod moe;

use crate::error::{CudaContextExt, Result};
use crate::ops::{Context, Stream};
use crate::runtime::buffer::{DeviceBuffer, EventTimer};
use crate::runtime::{graph, Device};
use crate::testing::Rng;
use cudarc::driver::sys;

/// One timed row.
#[derive(Clone, Debug)]
pub struct Row {
    pub op: String,
    pub shape: String,
    /// Median device time per launch.
    pub us: f64,
    /// Bytes the op must move at least (each input read once, each output written once).
    pub bytes: f64,
}

impl Row {
    pub fn gbps(&self) -> f64 {
        self.bytes / self.us / 1e3
    }
}

/// What every timed row needs: the context, its stream, the run length and a generator.
pub struct Bench<'a> {
    pub ctx: &'a Context,
    pub device: &'a Device,
    /// A valid stream of `device`.
    pub stream: Stream,
    pub iters: usize,
    pub rng: Rng,
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// `copies` copies of one tensor of `bytes` bytes, each starting on a 256-byte boundary.
pub struct Rotating<'a> {
    buf: DeviceBuffer<'a>,
    pitch: usize,
    copies: usize,
}

impl<'a> Rotating<'a> {
    /// Copies of random bf16 values drawn from N(0, 1).
    pub fn bf16(device: &'a Device, elems: usize, copies: usize, rng: &mut Rng) -> Result<Self> {
        Self::from_bytes(device, bytemuck_bf16(&rng.bf16_normal(elems, 1.0)), copies)
    }

    /// Copies of the given bytes.
    pub fn from_bytes(device: &'a Device, data: &[u8], copies: usize) -> Result<Self> {
        let pitch = data.len().div_ceil(256).max(1) * 256;
        let buf = DeviceBuffer::new(device, pitch * copies)?;
        buf.upload(data)?;
        for c in 1..copies {
            unsafe { device.copy(buf.ptr() + (c * pitch) as u64, buf.ptr(), data.len())? };
        }
        Ok(Rotating { buf, pitch, copies })
    }

    /// Uninitialised output copies of `bytes` bytes (poisoned, so a bug shows as NaN if ever read).
    pub fn output(device: &'a Device, bytes: usize, copies: usize) -> Result<Self> {
        let pitch = bytes.div_ceil(256).max(1) * 256;
        let buf = DeviceBuffer::new(device, pitch * copies)?;
        buf.poison()?;
        Ok(Rotating { buf, pitch, copies })
    }

    /// Address of copy `i` (modulo the number of copies).
    pub fn ptr(&self, i: usize) -> u64 {
        self.buf.ptr() + ((i % self.copies) * self.pitch) as u64
    }
}

fn bytemuck_bf16(v: &[crate::reference::bf16]) -> &[u8] {
    // bf16 is a plain 16-bit value with no padding.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

/// Copies needed so that sets of `bytes_per_set` bytes span at least twice the L2.
pub fn copies_for(device: &Device, bytes_per_set: usize) -> usize {
    (2 * device.info.l2_bytes as usize).div_ceil(bytes_per_set.max(1)).clamp(1, 4096) + 1
}

/// Device time per launch in µs, as an op runs inside a decode graph: `launch(0..iters)` is captured
/// into one CUDA graph (global mode, which also proves the op capturable), the graph is replayed, and
/// the median replay time is divided by `iters`. Warm-up launches run first, outside the capture, so
/// that kernels are compiled and loaded.
pub fn time_launches(
    device: &Device,
    stream: Stream,
    iters: usize,
    mut launch: impl FnMut(usize) -> Result<()>,
) -> Result<f64> {
    let iters = iters.max(1);
    for i in 0..iters.min(20) {
        launch(i)?;
    }
    unsafe { graph::begin_capture(device, stream.raw())? };
    let captured: Result<()> = (0..iters).try_for_each(&mut launch);
    let graph = unsafe { graph::end_capture(device, stream.raw()) };
    captured?;
    let graph = graph?;
    let replay = || unsafe { graph.launch(device, stream.raw()) };
    replay()?;
    if std::env::var_os("SPARKINFER_PROFILE").is_some() {
        profile_one(device, stream, &mut launch)?;
    }
    let timers: Vec<EventTimer> = (0..7).map(|_| EventTimer::new(device)).collect::<Result<_>>()?;
    for t in &timers {
        t.start(stream)?;
        replay()?;
        t.stop(stream)?;
    }
    let per_replay = median(timers.iter().map(|t| t.elapsed_us()).collect::<Result<_>>()?);
    Ok(per_replay / iters as f64)
}

/// One lone `launch(0)` between cuProfilerStart and cuProfilerStop, so that `ncu --profile-from-start off`
/// sees each timed row's kernels exactly once.
fn profile_one(device: &Device, stream: Stream, launch: &mut impl FnMut(usize) -> Result<()>) -> Result<()> {
    unsafe { sys::cuProfilerStart() }.result().during("cuProfilerStart")?;
    let launched = launch(0);
    let stopped = unsafe { sys::cuProfilerStop() }.result().during("cuProfilerStop");
    launched?;
    stopped?;
    unsafe { device.stream_synchronize(stream.raw()) }
}

/// Median device time in µs of `launch(i)` issued on its own, bracketed by an event pair per launch
/// (all queued back to back, read after one synchronisation). Includes the launch latency that a graph
/// hides.
pub fn time_isolated(
    device: &Device,
    stream: Stream,
    iters: usize,
    mut launch: impl FnMut(usize) -> Result<()>,
) -> Result<f64> {
    for i in 0..iters.min(20) {
        launch(i)?;
    }
    let timers: Vec<EventTimer> = (0..iters).map(|_| EventTimer::new(device)).collect::<Result<_>>()?;
    for (i, t) in timers.iter().enumerate() {
        t.start(stream)?;
        launch(i)?;
        t.stop(stream)?;
    }
    Ok(median(timers.iter().map(|t| t.elapsed_us()).collect::<Result<_>>()?))
}

/// Device-to-device copy bandwidth in GB/s, counting bytes read and written (1 GiB each way).
pub fn copy_bandwidth(device: &Device, stream: Stream) -> Result<f64> {
    let bytes = 1usize << 30;
    let a = DeviceBuffer::new(device, bytes)?;
    let b = DeviceBuffer::new(device, bytes)?;
    // Lone copies: at 1 GiB their launch latency is negligible, and graph memcpy nodes run slower.
    let us = time_isolated(device, stream, 20, |_| {
        unsafe { sys::cuMemcpyDtoDAsync_v2(b.ptr(), a.ptr(), bytes, stream.raw()) }.result().during("cuMemcpyDtoDAsync")
    })?;
    Ok(2.0 * bytes as f64 / us / 1e3)
}

/// Every family's rows, in the order they print.
pub fn all_rows(b: &mut Bench) -> Result<Vec<Row>> {
    family_rows(b, &[])
}

/// Benchmark families by name, in the order `all_rows` runs them.
pub const FAMILIES: [&str; 3] = ["foundation", "attention", "moe"];

/// The rows of the named families (`FAMILIES`; empty: all of them).
pub fn family_rows(b: &mut Bench, only: &[String]) -> Result<Vec<Row>> {
    if let Some(bad) = only.iter().find(|f| !FAMILIES.contains(&f.as_str())) {
        return Err(crate::error::Error::invalid(format!("--only: unknown family {bad:?} (known: {FAMILIES:?})")));
    }
    let wanted = |f: &str| only.is_empty() || only.iter().any(|o| o == f);
    let mut rows = Vec::new();
    if wanted("foundation") {
        rows.extend(foundation::rows(b)?);
    }
    if wanted("attention") {
        rows.extend(attention::rows(b)?);
    }
    if wanted("moe") {
        rows.extend(moe::rows(b)?);
    }
    Ok(rows)
}

/// Named extra figures (launch overheads), in µs.
pub fn extra_figures(b: &mut Bench) -> Result<Vec<(String, f64)>> {
    foundation::launch_overhead(b)
}
