//! Rows for decode attention at the shapes. Bytes are the K and V cache bytes the op must read
//! (the visible keys of each sequence) plus q and out.

use super::{copies_for, time_launches, Bench, Rotating, Row};
use crate::error::Result;
use crate::ops::attention::{self, CacheLayout, CacheTensor, DecodeArgs};
use crate::runtime::buffer::DeviceBuffer;
use crate::testing::Rng;

/// One benchmarked configuration.
#[derive(Clone, Debug)]
struct Config {
    label: &'static str,
    hq: usize,
    hkv: usize,
    d: usize,
    window: Option<usize>,
    scale: f32,
    lens: Vec<i32>,
    /// New tokens per sequence (speculative decoding verifies several).
    q_len: usize,
    /// Tokens per page; None for a contiguous [batch, max, kv_heads, head_dim] cache.
    page_size: Option<usize>,
    /// Contiguous only: [batch, kv_heads, max, head_dim] (each head's keys contiguous) instead.
    head_major: bool,
}

const QWEN: (&str, usize, usize, usize, f32) = ("qwen3.5 16/2 hd256", 16, 2, 256, 0.0625);
const GEMMA_GLOBAL: (&str, usize, usize, usize, f32) = ("gemma4 global 16/2 hd512", 16, 2, 512, 1.0);
const GENERIC: (&str, usize, usize, usize, f32) = ("generic 32/8 hd128", 32, 8, 128, 0.088_388_35);

fn config(shape: (&'static str, usize, usize, usize, f32), lens: Vec<i32>) -> Config {
    let (label, hq, hkv, d, scale) = shape;
    Config { label, hq, hkv, d, window: None, scale, lens, q_len: 1, page_size: None, head_major: false }
}

fn configs() -> Vec<Config> {
    let mut out = Vec::new();
    for ctx in [32768, 4096] {
        for shape in [QWEN, GEMMA_GLOBAL, GENERIC] {
            out.push(config(shape, vec![ctx]));
        }
    }
    for ctx in [32768, 4096] {
        let mut local = config(("gemma4 local 16/8 hd256 w1024", 16, 8, 256, 1.0), vec![ctx]);
        local.window = Some(1024);
        out.push(local);
    }
    // 16 sequences spread evenly over 1K-32K.
    out.push(config(QWEN, (0..16).map(|i| 1024 + i * (31 * 1024) / 15).collect()));
    out.push(config(QWEN, vec![4096; 64]));
    // Verifying 4 draft tokens (group 8 x 4 = 32 rows per KV head).
    for ctx in [32768, 4096] {
        let mut spec = config(QWEN, vec![ctx]);
        spec.q_len = 4;
        out.push(spec);
    }
    for ctx in [32768, 4096] {
        let mut paged = config(QWEN, vec![ctx]);
        paged.page_size = Some(64);
        out.push(paged);
    }
    // The same bytes with each KV head's keys contiguous: a K or V tile is one run of 16 · 512 bytes, not 16
    // runs of 512 bytes a token's stride apart.
    let mut head_major = config(QWEN, vec![32768]);
    head_major.head_major = true;
    out.push(head_major);
    out
}

/// Random-looking bf16 data of `elems` elements: one random block repeated (generating hundreds of
/// MiB of normals on the host would dominate the benchmark's run time, and the values do not matter).
fn filler(elems: usize, rng: &mut Rng) -> Vec<u8> {
    let block = rng.bf16_normal(1 << 16, 1.0);
    let bytes: &[u8] = unsafe { std::slice::from_raw_parts(block.as_ptr() as *const u8, block.len() * 2) };
    bytes.iter().copied().cycle().take(elems * 2).collect()
}

fn decode_row(b: &mut Bench, c: &Config) -> Result<Row> {
    let batch = c.lens.len();
    let max = *c.lens.iter().max().unwrap_or(&1) as usize;
    let (hkv, d) = (c.hkv, c.d);
    let (slots, tokens_per_slot) = match c.page_size {
        Some(ps) => (batch * max.div_ceil(ps), ps),
        None => (batch, max),
    };
    let cache_elems = slots * tokens_per_slot * hkv * d;
    let visible: usize = c.lens.iter().map(|&l| c.window.map_or(l as usize, |w| (l as usize).min(w))).sum();
    let act_bytes = batch * c.q_len * c.hq * d * 2;
    let bytes = visible * hkv * d * 2 * 2 + 2 * act_bytes;
    // Copies enough that the bytes a launch reads (a window's keys, not the whole cache) exceed twice the
    // L2 over the rotation: sized by the whole cache, the windowed row rotated two copies and read its
    // window from L2.
    let copies = copies_for(b.device, bytes);
    let k = Rotating::from_bytes(b.device, &filler(cache_elems, &mut b.rng), copies)?;
    let v = Rotating::from_bytes(b.device, &filler(cache_elems, &mut b.rng), copies)?;
    let q = Rotating::bf16(b.device, batch * c.q_len * c.hq * d, copies, &mut b.rng)?;
    let out = Rotating::output(b.device, act_bytes, copies)?;
    let lens = DeviceBuffer::from_slice(b.device, &c.lens)?;
    // Pages in shuffled order, as a long-running server's allocator leaves them.
    let mut table: Vec<i32> = (0..slots as i32).collect();
    for i in (1..table.len()).rev() {
        table.swap(i, (b.rng.next_u64() % (i as u64 + 1)) as usize);
    }
    let table = DeviceBuffer::from_slice(b.device, &table)?;
    let (stride_token, stride_head) = if c.head_major { (d, tokens_per_slot * d) } else { (hkv * d, d) };
    let cache = |ptr: u64| CacheTensor {
        ptr,
        stride_seq: (tokens_per_slot * hkv * d) as i64,
        stride_token: stride_token as i64,
        stride_head: stride_head as i64,
        elems: cache_elems as i64,
    };
    let layout = match c.page_size {
        Some(ps) => CacheLayout::Paged {
            page_table: table.ptr(),
            page_table_stride: 0,
            page_size: ps as i64,
            num_pages: slots as i64,
        },
        None => CacheLayout::Contiguous,
    };
    let args = |i: usize, workspace: u64, workspace_bytes: u64| DecodeArgs {
        q: q.ptr(i),
        q_strides: [0; 3],
        k: cache(k.ptr(i)),
        v: cache(v.ptr(i)),
        layout,
        seq_lens: lens.ptr(),
        out: out.ptr(i),
        out_strides: [0; 3],
        lse: 0,
        workspace,
        workspace_bytes,
        batch: batch as i64,
        q_len: c.q_len as i64,
        num_q_heads: c.hq as i64,
        num_kv_heads: hkv as i64,
        head_dim: d as i64,
        max_seq_len: max as i64,
        window: c.window.map(|w| w as i64),
        causal: true,
        scale: c.scale,
        softcap: None,
    };
    let ws_bytes = attention::decode_workspace_size(b.ctx, &args(0, 0, 0))?;
    let ws = DeviceBuffer::new(b.device, ws_bytes.max(16))?;
    let (ctx, stream) = (b.ctx, b.stream);
    let us = time_launches(b.device, b.stream, b.iters, |i| {
        // Every buffer above holds the extent the arguments describe, for every copy.
        unsafe { attention::decode(ctx, &args(i, ws.ptr(), ws_bytes as u64), stream) }
    })?;
    let lens_text = if batch == 1 {
        format!("ctx {max}")
    } else {
        format!("B={batch} ctx {}-{max}", c.lens.iter().min().unwrap_or(&0))
    };
    let layout_text = match (c.page_size, c.head_major) {
        (Some(ps), _) => format!(" paged {ps}"),
        (None, true) => " head-major".to_string(),
        (None, false) => String::new(),
    };
    let tq_text = if c.q_len > 1 { format!(" Tq={}", c.q_len) } else { String::new() };
    Ok(Row {
        op: "attention".into(),
        shape: format!("{} {lens_text}{layout_text}{tq_text}", c.label),
        us,
        bytes: bytes as f64,
    })
}

/// Prefill of a T-token chunk that is the whole sequence (causal); the shape text carries the achieved
/// TFLOP/s (4·T²/2·D·Hq useful flops: QKᵀ and PV over the causal half).
fn prefill_row(b: &mut Bench, shape: (&'static str, usize, usize, usize, f32), t: usize) -> Result<Row> {
    let (label, hq, hkv, d, scale) = shape;
    let cache_elems = t * hkv * d;
    let act_elems = t * hq * d;
    let copies = copies_for(b.device, (2 * cache_elems + 2 * act_elems) * 2);
    let k = Rotating::bf16(b.device, cache_elems, copies, &mut b.rng)?;
    let v = Rotating::bf16(b.device, cache_elems, copies, &mut b.rng)?;
    let q = Rotating::bf16(b.device, act_elems, copies, &mut b.rng)?;
    let out = Rotating::output(b.device, act_elems * 2, copies)?;
    let lens = DeviceBuffer::from_slice(b.device, &[t as i32])?;
    let cache = |ptr: u64| CacheTensor {
        ptr,
        stride_seq: cache_elems as i64,
        stride_token: (hkv * d) as i64,
        stride_head: d as i64,
        elems: cache_elems as i64,
    };
    let (ctx, stream) = (b.ctx, b.stream);
    let us = time_launches(b.device, b.stream, b.iters, |i| {
        let args = DecodeArgs {
            q: q.ptr(i),
            q_strides: [0; 3],
            k: cache(k.ptr(i)),
            v: cache(v.ptr(i)),
            layout: CacheLayout::Contiguous,
            seq_lens: lens.ptr(),
            out: out.ptr(i),
            out_strides: [0; 3],
            lse: 0,
            workspace: 0,
            workspace_bytes: 0,
            batch: 1,
            q_len: t as i64,
            num_q_heads: hq as i64,
            num_kv_heads: hkv as i64,
            head_dim: d as i64,
            max_seq_len: t as i64,
            window: None,
            causal: true,
            scale,
            softcap: None,
        };
        // Every buffer above holds the extent the arguments describe, for every copy.
        unsafe { attention::prefill(ctx, &args, stream) }
    })?;
    let flops = 2.0 * (t as f64) * (t as f64) * (d as f64) * (hq as f64);
    Ok(Row {
        op: "attention prefill".into(),
        shape: format!("{label} T={t} ctx {t} causal: {:.1} TFLOP/s", flops / us / 1e6),
        us,
        bytes: ((2 * cache_elems + 2 * act_elems) * 2) as f64,
    })
}

pub fn rows(b: &mut Bench) -> Result<Vec<Row>> {
    let mut rows: Vec<Row> = configs().iter().map(|c| decode_row(b, c)).collect::<Result<_>>()?;
    rows.push(prefill_row(b, QWEN, 2048)?);
    rows.push(prefill_row(b, GEMMA_GLOBAL, 2048)?);
    Ok(rows)
}
