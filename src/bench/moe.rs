//! Rows for the MoE block and its parts at the two models' shapes.
//!
//! Byte floor of a block row: the distinct selected experts' weights, the dense/shared FFN and the router
//! weights, each read once, plus x and out. The distinct experts of random routing are counted by their
//! expectation `E · (1 − (1 − k/E)^T)` (exactly k at T = 1). Expert weights are one copy (hundreds of MiB,
//! far larger than L2); x, the router and the dense weights rotate through copies spanning twice the L2.

use super::{copies_for, time_launches, Bench, Rotating, Row};
use crate::checks::moe::{fast_bf16, MoeShape, GEMMA4, QWEN35};
use crate::error::Result;
use crate::ops::moe::{self as ops, DenseFfn, ExpertFfnArgs, MoeForwardArgs, RoutedExperts, TopkArgs};
use crate::reference::moe::Scoring;

fn bytes_of(v: &[crate::reference::bf16]) -> &[u8] {
    // bf16 is a plain 16-bit value with no padding.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

/// Device copies of one model's MoE weights.
struct Weights<'a> {
    s: MoeShape,
    router: Rotating<'a>,
    input_scale: Rotating<'a>,
    expert_scale: Rotating<'a>,
    gate_up: Rotating<'a>,
    down: Rotating<'a>,
    dense_gate_up: Rotating<'a>,
    dense_down: Rotating<'a>,
    dense_gate: Rotating<'a>,
}

impl<'a> Weights<'a> {
    fn new(b: &mut Bench<'a>, s: MoeShape) -> Result<Self> {
        let (h, e, i, di) = (s.hidden, s.experts, s.inter, s.dense_inter);
        let rotating_bytes = (e * h + 3 * di * h) * 2;
        let copies = copies_for(b.device, rotating_bytes);
        let rng = &mut b.rng;
        let rot = |v: Vec<crate::reference::bf16>, copies: usize| Rotating::from_bytes(b.device, bytes_of(&v), copies);
        let expert_scale: Vec<u8> = (0..e).flat_map(|_| rng.range(0.5, 1.5).to_le_bytes()).collect();
        Ok(Weights {
            s,
            router: rot(fast_bf16(rng, e * h, 4.0 / (h as f32).sqrt()), copies)?,
            input_scale: rot(fast_bf16(rng, h, 0.3), 1)?,
            expert_scale: Rotating::from_bytes(b.device, &expert_scale, 1)?,
            gate_up: rot(fast_bf16(rng, e * 2 * i * h, 1.0 / (h as f32).sqrt()), 1)?,
            down: rot(fast_bf16(rng, e * h * i, 1.0 / (i as f32).sqrt()), 1)?,
            dense_gate_up: rot(fast_bf16(rng, 2 * di * h, 1.0 / (h as f32).sqrt()), copies)?,
            dense_down: rot(fast_bf16(rng, h * di, 1.0 / (di as f32).sqrt()), copies)?,
            dense_gate: rot(fast_bf16(rng, h, 1.0 / (h as f32).sqrt()), copies)?,
        })
    }

    fn block_args(&self, i: usize, x: u64, out: u64, tokens: usize, ws: (u64, usize)) -> MoeForwardArgs {
        self.block_args_dense(i, x, out, tokens, ws, true)
    }

    /// The block's arguments; `dense` false leaves out the dense/shared FFN.
    fn block_args_dense(
        &self,
        i: usize,
        x: u64,
        out: u64,
        tokens: usize,
        ws: (u64, usize),
        dense: bool,
    ) -> MoeForwardArgs {
        let s = &self.s;
        MoeForwardArgs {
            ffn: ExpertFfnArgs {
                x,
                x_row_stride: 0,
                out,
                out_row_stride: 0,
                accumulate: false,
                tokens: tokens as i64,
                hidden: s.hidden as i64,
                activation: s.activation(),
                routed: Some(RoutedExperts {
                    gate_up: self.gate_up.ptr(0),
                    down: self.down.ptr(0),
                    experts: s.experts as i64,
                    inter: s.inter as i64,
                    top_k: s.top_k as i64,
                    topk_ids: 0,
                    topk_weights: 0,
                    expert_offsets: 0,
                    sorted_slots: 0,
                }),
                dense: dense.then(|| DenseFfn {
                    gate_up: self.dense_gate_up.ptr(i),
                    down: self.dense_down.ptr(i),
                    inter: s.dense_inter as i64,
                    gate_weight: if s.gemma { 0 } else { self.dense_gate.ptr(i) },
                }),
                workspace: ws.0,
                workspace_bytes: ws.1,
            },
            router_weight: self.router.ptr(i),
            router_input_scale: if s.gemma { self.input_scale.ptr(0) } else { 0 },
            router_eps: 1e-6,
            scoring: Scoring::Softmax,
            renormalize: true,
            expert_scale: if s.gemma { self.expert_scale.ptr(0) } else { 0 },
        }
    }

    fn distinct_experts(&self, tokens: usize) -> f64 {
        let (e, k) = (self.s.experts as f64, self.s.top_k as f64);
        e * (1.0 - (1.0 - k / e).powi(tokens as i32))
    }

    /// Byte floor of the block at `tokens` tokens.
    fn block_bytes(&self, tokens: usize) -> f64 {
        self.routed_bytes(tokens) + ops::expert_bytes(self.s.hidden, self.s.dense_inter) as f64
    }

    /// Byte floor of the block without its dense/shared FFN.
    fn routed_bytes(&self, tokens: usize) -> f64 {
        let s = &self.s;
        self.distinct_experts(tokens) * ops::expert_bytes(s.hidden, s.inter) as f64
            + (s.experts * s.hidden * 2) as f64
            + (2 * tokens * s.hidden * 2) as f64
    }
}

/// Rotating inputs, outputs and a workspace per copy for one token count.
struct Io<'a> {
    x: Rotating<'a>,
    out: Rotating<'a>,
    ws: Rotating<'a>,
    ws_bytes: usize,
}

impl<'a> Io<'a> {
    fn new(b: &mut Bench<'a>, s: &MoeShape, tokens: usize, copies: usize) -> Result<Self> {
        let ws_bytes = s.block_layout(tokens)?.total();
        Ok(Io {
            x: Rotating::bf16(b.device, tokens * s.hidden, copies, &mut b.rng)?,
            out: Rotating::output(b.device, tokens * s.hidden * 2, copies)?,
            ws: Rotating::output(b.device, ws_bytes, copies)?,
            ws_bytes,
        })
    }
}

/// The block at `tokens` tokens; `dense` false leaves out the dense/shared FFN (router, top-k and the
/// routed experts only: the Gemma 4 decode target's definition).
fn block_row(b: &mut Bench, w: &Weights, tokens: usize, dense: bool) -> Result<Row> {
    let io = Io::new(b, &w.s, tokens, 64)?;
    let (ctx, stream) = (b.ctx, b.stream);
    let us = time_launches(b.device, stream, b.iters, |i| {
        let args = w.block_args_dense(i, io.x.ptr(i), io.out.ptr(i), tokens, (io.ws.ptr(i), io.ws_bytes), dense);
        // Every buffer holds its copies' full extents.
        unsafe { ops::moe_forward(ctx, &args, stream) }
    })?;
    let (suffix, bytes) = if dense { ("", w.block_bytes(tokens)) } else { (" no dense", w.routed_bytes(tokens)) };
    Ok(Row {
        op: "moe_block".into(),
        shape: format!("{} T={tokens} E={} k={}{suffix}", w.s.label, w.s.experts, w.s.top_k),
        us,
        bytes,
    })
}

/// The block's three stages timed one at a time at T = 1 (router GEMM, top-k + index, expert FFN with the
/// dense FFN), plus router + top-k together: how the decode time splits.
fn split_rows(b: &mut Bench, w: &Weights) -> Result<Vec<Row>> {
    let s = w.s;
    let io = Io::new(b, &s, 1, 64)?;
    let layout = s.block_layout(1)?;
    let (ctx, stream) = (b.ctx, b.stream);
    // Route every copy once so that each workspace holds a valid routing for the FFN stage.
    for i in 0..64 {
        let args = w.block_args(i, io.x.ptr(i), io.out.ptr(i), 1, (io.ws.ptr(i), io.ws_bytes));
        unsafe { ops::moe_forward(ctx, &args, stream)? };
    }
    let at = |i: usize, off: usize| io.ws.ptr(i) + off as u64;
    let router = |i: usize| {
        let a = w.block_args(i, io.x.ptr(i), io.out.ptr(i), 1, (io.ws.ptr(i), io.ws_bytes));
        ops::RouterGemmArgs {
            x: io.x.ptr(i),
            x_row_stride: 0,
            weight: a.router_weight,
            input_scale: a.router_input_scale,
            eps: 1e-6,
            logits: at(i, layout.logits),
            logits_row_stride: 0,
            tokens: 1,
            hidden: s.hidden as i64,
            experts: s.experts as i64,
        }
    };
    let topk = |i: usize| TopkArgs {
        logits: at(i, layout.logits),
        logits_row_stride: 0,
        tokens: 1,
        experts: s.experts as i64,
        top_k: s.top_k as i64,
        scoring: Scoring::Softmax,
        renormalize: true,
        expert_scale: if s.gemma { w.expert_scale.ptr(0) } else { 0 },
        topk_ids: at(i, layout.ids),
        topk_weights: at(i, layout.weights),
        expert_counts: at(i, layout.counts),
        expert_offsets: at(i, layout.offsets),
        sorted_slots: at(i, layout.sorted),
    };
    let router_us = time_launches(b.device, stream, b.iters, |i| unsafe { ops::router_gemm(ctx, &router(i), stream) })?;
    let topk_us = time_launches(b.device, stream, b.iters, |i| unsafe { ops::topk_router(ctx, &topk(i), stream) })?;
    let both_us = time_launches(b.device, stream, b.iters, |i| unsafe {
        ops::router_gemm(ctx, &router(i), stream)?;
        ops::topk_router(ctx, &topk(i), stream)
    })?;
    // The FFN stage uses the block's own workspace: its routing sits before the FFN regions.
    let ffn_us = time_launches(b.device, stream, b.iters, |i| {
        let mut a = w.block_args(i, io.x.ptr(i), io.out.ptr(i), 1, (io.ws.ptr(i), io.ws_bytes)).ffn;
        if let Some(r) = a.routed.as_mut() {
            r.topk_ids = at(i, layout.ids);
            r.topk_weights = at(i, layout.weights);
            r.expert_offsets = at(i, layout.offsets);
            r.sorted_slots = at(i, layout.sorted);
        }
        // The FFN's scratch goes after the routing so the two never overlap.
        a.workspace = at(i, layout.sorted + 256 * (s.top_k * 4).div_ceil(256));
        a.workspace_bytes = io.ws_bytes - (a.workspace - io.ws.ptr(i)) as usize;
        unsafe { ops::expert_ffn(ctx, &a, stream) }
    })?;
    let shape = format!("{} T=1", s.label);
    let router_bytes = (s.experts * s.hidden * 2) as f64;
    Ok(vec![
        Row { op: "moe_router_gemm".into(), shape: shape.clone(), us: router_us, bytes: router_bytes },
        Row { op: "moe_topk".into(), shape: shape.clone(), us: topk_us, bytes: (s.experts * 4) as f64 },
        Row { op: "moe_router+topk".into(), shape: shape.clone(), us: both_us, bytes: router_bytes },
        Row { op: "moe_expert_ffn".into(), shape, us: ffn_us, bytes: w.block_bytes(1) - router_bytes },
    ])
}

/// A prefill chunk of `tokens` through the whole block, with its achieved TFLOP/s: 2 flops per
/// multiply-add of the router GEMM, the k selected experts' gate, up and down projections and the dense
/// FFN, per token. Two input copies (the weights alone exceed the L2 many times) and few launches: one
/// call takes milliseconds.
fn prefill_row(b: &mut Bench, w: &Weights, tokens: usize) -> Result<Row> {
    let s = &w.s;
    let io = Io::new(b, s, tokens, 2)?;
    let (ctx, stream) = (b.ctx, b.stream);
    let us = time_launches(b.device, stream, b.iters.min(10), |i| {
        let args = w.block_args(i, io.x.ptr(i), io.out.ptr(i), tokens, (io.ws.ptr(i), io.ws_bytes));
        unsafe { ops::moe_forward(ctx, &args, stream) }
    })?;
    let per_token = 2.0 * (s.hidden * s.experts + 3 * s.hidden * (s.top_k * s.inter + s.dense_inter)) as f64;
    let tflops = per_token * tokens as f64 / us / 1e6;
    Ok(Row {
        op: "moe_block".into(),
        shape: format!("{} T={tokens} E={} k={}: {tflops:.1} TFLOP/s", s.label, s.experts, s.top_k),
        us,
        bytes: w.block_bytes(tokens),
    })
}

pub fn rows(b: &mut Bench) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for shape in [QWEN35, GEMMA4] {
        let w = Weights::new(b, shape)?;
        for tokens in [1, 8, 64] {
            rows.push(block_row(b, &w, tokens, true)?);
        }
        if shape.gemma {
            rows.push(block_row(b, &w, 1, false)?);
        }
        if shape.label == QWEN35.label {
            rows.push(prefill_row(b, &w, 2048)?);
        }
        rows.extend(split_rows(b, &w)?);
    }
    Ok(rows)
}
