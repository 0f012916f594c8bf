//! Checks of the MoE ops: the whole block (router → top-k → experts + dense FFN) with its routing read back
//! from the workspace, the top-k router alone on constructed logits (ties, concentrated routing, NaN), and
//! the dense FFN alone. Oracle: `reference::moe` for a CUDA context, the independent formulas of
//! [`naive`] on the CPU backend.

#[path = "moe_naive.rs"]
pub mod naive;

use super::{CheckResult, ModelCheck};
use crate::error::Result;
use crate::ops::moe::{self as ops, DenseFfn, ExpertFfnArgs, MoeForwardArgs, RoutedExperts, TopkArgs};
use crate::ops::{Backend, Context, Stream};
use crate::reference::moe::{self as refmoe, Activation, FfnWeights, RouterTransform, Scoring, TopkConfig};
use crate::reference::{self, bf16};
use crate::testing::{Comparison, Rng, TestBuffer, BF16_TOL, F32_TOL};

/// The MoE shape of a model (MODELS.md).
#[derive(Clone, Copy, Debug)]
pub struct MoeShape {
    pub label: &'static str,
    pub hidden: usize,
    pub experts: usize,
    pub top_k: usize,
    pub inter: usize,
    /// Intermediate of the dense / shared FFN, 0 for none.
    pub dense_inter: usize,
    /// Gemma 4 conventions: router input transform, per-expert scale, GeGLU-tanh, ungated dense MLP.
    /// Otherwise Qwen3.5's: plain router, SwiGLU, shared expert gated by sigmoid(x · w_sg).
    pub gemma: bool,
}

pub const QWEN35: MoeShape =
    MoeShape { label: "qwen3.5", hidden: 2048, experts: 256, top_k: 8, inter: 512, dense_inter: 512, gemma: false };
pub const GEMMA4: MoeShape =
    MoeShape { label: "gemma4", hidden: 2816, experts: 128, top_k: 8, inter: 704, dense_inter: 2112, gemma: true };

impl MoeShape {
    /// Where the block call of `tokens` tokens places its routing in the workspace, and its size
    /// (`layout.total()`).
    pub fn block_layout(&self, tokens: usize) -> Result<ops::BlockLayout> {
        ops::moe_forward_layout(
            tokens as i64,
            self.hidden as i64,
            self.experts as i64,
            self.top_k as i64,
            self.inter as i64,
            self.dense_inter as i64,
        )
    }

    pub fn activation(&self) -> Activation {
        if self.gemma {
            Activation::GeluTanh
        } else {
            Activation::Silu
        }
    }

    /// The same shape with fewer experts (the CPU backend's checks keep memory small).
    pub fn with_experts(self, experts: usize) -> MoeShape {
        MoeShape { experts, ..self }
    }
}

/// How the router's decisions are arranged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoutingPattern {
    /// Random router weights.
    Random,
    /// Zero router weights: every logit ties, every token picks experts 0..k−1 (all tokens on the same
    /// experts, the rest empty).
    Tied,
}

#[derive(Clone, Copy, Debug)]
pub struct BlockCase {
    pub shape: MoeShape,
    pub tokens: usize,
    pub routing: RoutingPattern,
    /// Add into random existing output values.
    pub accumulate: bool,
    /// Extra elements per row of x and out (multiple of 8).
    pub pad: usize,
    /// Put a NaN into token 0's input.
    pub nan_token: bool,
}

/// What a MoE check found.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub out: Comparison,
    pub logits: Option<Comparison>,
    pub weights: Option<Comparison>,
    /// Exact parts (ids, counts, offsets, sorted slots, ranges) that differ, described.
    pub mismatches: Vec<String>,
    /// Elements written outside the outputs (row padding, workspace guard).
    pub stray_writes: usize,
}

impl Outcome {
    pub fn passes(&self, tol: f64) -> bool {
        self.out.passes(tol)
            && self.logits.is_none_or(|c| c.passes(F32_TOL))
            && self.weights.is_none_or(|c| c.passes(F32_TOL))
            && self.mismatches.is_empty()
            && self.stray_writes == 0
    }

    pub fn describe(&self) -> String {
        format!(
            "out rel err {:.3e} ({} non-finite), logits {}, weights {}, {} stray writes, mismatches: [{}]",
            self.out.rel_l2,
            self.out.non_finite,
            self.logits.map_or("-".into(), |c| format!("{:.3e} ({} non-finite)", c.rel_l2, c.non_finite)),
            self.weights.map_or("-".into(), |c| format!("{:.3e} ({} non-finite)", c.rel_l2, c.non_finite)),
            self.stray_writes,
            self.mismatches.join("; ")
        )
    }

    fn into_check_result(self) -> CheckResult {
        // The fp32 parts have their own, tighter bound: a miss counts as a mismatch of the check.
        let fp32_misses = [self.logits, self.weights].iter().flatten().filter(|c| !c.passes(F32_TOL)).count();
        CheckResult {
            out: self.out,
            residual: None,
            stray_writes: self.stray_writes + self.mismatches.len() + fp32_misses,
        }
    }
}

/// Random bf16 values, uniform with standard deviation `std`, from 8 random bits each: fast enough for the
/// hundreds of MiB of stacked expert weights.
pub fn fast_bf16(rng: &mut Rng, n: usize, std: f32) -> Vec<bf16> {
    let step = std / 73.9;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let r = rng.next_u64();
        for b in 0..8 {
            if out.len() < n {
                out.push(bf16::from_f32(((r >> (8 * b)) as u8 as i8) as f32 * step));
            }
        }
    }
    out
}

fn exact<T: PartialEq + std::fmt::Debug>(what: &str, got: &[T], want: &[T], mismatches: &mut Vec<String>) {
    if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i]) {
        let n = (0..want.len()).filter(|&i| got[i] != want[i]).count();
        mismatches.push(format!(
            "{what}: {n} of {} differ, first at {i}: got {:?}, want {:?}",
            want.len(),
            got[i],
            want[i]
        ));
    }
}

/// Model weights of one case.
pub struct BlockWeights {
    pub router: Vec<bf16>,
    pub input_scale: Option<Vec<bf16>>,
    pub expert_scale: Option<Vec<f32>>,
    pub gate_up: Vec<bf16>,
    pub down: Vec<bf16>,
    pub dense_gate_up: Vec<bf16>,
    pub dense_down: Vec<bf16>,
    pub dense_gate: Option<Vec<bf16>>,
}

impl BlockWeights {
    pub fn random(s: &MoeShape, routing: RoutingPattern, rng: &mut Rng) -> BlockWeights {
        let (h, e, i, di) = (s.hidden, s.experts, s.inter, s.dense_inter);
        let router = match routing {
            // Scaled up so that the softmax is peaked, as trained routers are.
            RoutingPattern::Random => fast_bf16(rng, e * h, 4.0 / (h as f32).sqrt()),
            RoutingPattern::Tied => vec![bf16::ZERO; e * h],
        };
        BlockWeights {
            router,
            input_scale: s.gemma.then(|| (0..h).map(|_| bf16::from_f32(rng.range(0.5, 1.5))).collect()),
            expert_scale: s.gemma.then(|| (0..e).map(|_| rng.range(0.5, 1.5)).collect()),
            gate_up: fast_bf16(rng, e * 2 * i * h, 1.0 / (h as f32).sqrt()),
            down: fast_bf16(rng, e * h * i, 1.0 / (i as f32).sqrt()),
            dense_gate_up: fast_bf16(rng, 2 * di * h, 1.0 / (h as f32).sqrt()),
            dense_down: fast_bf16(rng, h * di, 1.0 / (di.max(1) as f32).sqrt()),
            dense_gate: (!s.gemma && di > 0).then(|| fast_bf16(rng, h, 1.0 / (h as f32).sqrt())),
        }
    }
}

/// Weights uploaded into the context's memory.
pub struct DeviceWeights<'a> {
    pub router: TestBuffer<'a>,
    pub input_scale: Option<TestBuffer<'a>>,
    pub expert_scale: Option<TestBuffer<'a>>,
    pub gate_up: TestBuffer<'a>,
    pub down: TestBuffer<'a>,
    pub dense_gate_up: TestBuffer<'a>,
    pub dense_down: TestBuffer<'a>,
    pub dense_gate: Option<TestBuffer<'a>>,
}

impl<'a> DeviceWeights<'a> {
    pub fn upload(ctx: &'a Context, w: &BlockWeights) -> Result<Self> {
        Ok(DeviceWeights {
            router: TestBuffer::from_slice(ctx, &w.router)?,
            input_scale: w.input_scale.as_ref().map(|v| TestBuffer::from_slice(ctx, v)).transpose()?,
            expert_scale: w.expert_scale.as_ref().map(|v| TestBuffer::from_slice(ctx, v)).transpose()?,
            gate_up: TestBuffer::from_slice(ctx, &w.gate_up)?,
            down: TestBuffer::from_slice(ctx, &w.down)?,
            dense_gate_up: TestBuffer::from_slice(ctx, &w.dense_gate_up)?,
            dense_down: TestBuffer::from_slice(ctx, &w.dense_down)?,
            dense_gate: w.dense_gate.as_ref().map(|v| TestBuffer::from_slice(ctx, v)).transpose()?,
        })
    }

    /// The block's arguments for `tokens` tokens; routing fields of `routed` are filled by the block.
    pub fn block_args(
        &self,
        s: &MoeShape,
        tokens: usize,
        x: (u64, usize),
        out: (u64, usize),
        accumulate: bool,
        workspace: (u64, usize),
    ) -> MoeForwardArgs {
        MoeForwardArgs {
            ffn: ExpertFfnArgs {
                x: x.0,
                x_row_stride: x.1 as i64,
                out: out.0,
                out_row_stride: out.1 as i64,
                accumulate,
                tokens: tokens as i64,
                hidden: s.hidden as i64,
                activation: s.activation(),
                routed: Some(RoutedExperts {
                    gate_up: self.gate_up.ptr(),
                    down: self.down.ptr(),
                    experts: s.experts as i64,
                    inter: s.inter as i64,
                    top_k: s.top_k as i64,
                    topk_ids: 0,
                    topk_weights: 0,
                    expert_offsets: 0,
                    sorted_slots: 0,
                }),
                dense: (s.dense_inter > 0).then(|| DenseFfn {
                    gate_up: self.dense_gate_up.ptr(),
                    down: self.dense_down.ptr(),
                    inter: s.dense_inter as i64,
                    gate_weight: self.dense_gate.as_ref().map_or(0, |b| b.ptr()),
                }),
                workspace: workspace.0,
                workspace_bytes: workspace.1,
            },
            router_weight: self.router.ptr(),
            router_input_scale: self.input_scale.as_ref().map_or(0, |b| b.ptr()),
            router_eps: 1e-6,
            scoring: Scoring::Softmax,
            renormalize: true,
            expert_scale: self.expert_scale.as_ref().map_or(0, |b| b.ptr()),
        }
    }
}

/// Routing read back from a block's workspace.
pub struct WorkspaceRouting {
    pub logits: Vec<f32>,
    pub ids: Vec<i32>,
    pub weights: Vec<f32>,
    pub counts: Vec<i32>,
    pub offsets: Vec<i32>,
    pub sorted: Vec<i32>,
}

pub fn read_routing(ws: &TestBuffer, s: &MoeShape, tokens: usize) -> Result<WorkspaceRouting> {
    let l = s.block_layout(tokens)?;
    let bytes: Vec<u8> = ws.download(l.total())?;
    let f32s = |at: usize, n: usize| {
        (0..n).map(|i| f32::from_le_bytes(bytes[at + 4 * i..at + 4 * i + 4].try_into().unwrap())).collect::<Vec<_>>()
    };
    let i32s = |at: usize, n: usize| {
        (0..n).map(|i| i32::from_le_bytes(bytes[at + 4 * i..at + 4 * i + 4].try_into().unwrap())).collect::<Vec<_>>()
    };
    let (t, e, k) = (tokens, s.experts, s.top_k);
    Ok(WorkspaceRouting {
        logits: f32s(l.logits, t * e),
        ids: i32s(l.ids, t * k),
        weights: f32s(l.weights, t * k),
        counts: i32s(l.counts, e),
        offsets: i32s(l.offsets, e + 1),
        sorted: i32s(l.sorted, t * k),
    })
}

/// The oracle's routing of given logits: (ids, weights, counts, offsets, sorted).
fn oracle_routing(
    ctx: &Context,
    logits: &[f32],
    tokens: usize,
    experts: usize,
    cfg: &TopkConfig,
    sigmoid: bool,
) -> refmoe::Routing {
    match ctx.backend() {
        Backend::Cuda(_) => refmoe::topk_router(logits, tokens, experts, cfg),
        Backend::Cpu => {
            let mut ids = Vec::new();
            let mut weights = Vec::new();
            for row in logits.chunks_exact(experts) {
                let (i, w) = naive::topk_row(row, cfg.top_k, sigmoid, cfg.renormalize, cfg.expert_scale);
                ids.extend(i.iter().map(|&e| e as i32));
                weights.extend(w.iter().map(|&v| v as f32));
            }
            let (counts, offsets, sorted_slots) = naive::index(&ids, experts);
            refmoe::Routing { ids, weights, counts, offsets, sorted_slots }
        }
    }
}

/// The oracle's block output before rounding, per token row, from given routing.
fn oracle_output(ctx: &Context, s: &MoeShape, w: &BlockWeights, x: &[bf16], ids: &[i32], weights: &[f32]) -> Vec<f64> {
    let (h, k) = (s.hidden, s.top_k);
    let dense = FfnWeights { gate_up: &w.dense_gate_up, down: &w.dense_down, inter: s.dense_inter };
    match ctx.backend() {
        Backend::Cuda(_) => {
            let mut y = refmoe::expert_ffn(x, h, &w.gate_up, &w.down, s.inter, ids, weights, k, s.activation());
            if s.dense_inter > 0 {
                let d = refmoe::dense_ffn(x, h, &dense, w.dense_gate.as_deref(), s.activation());
                y.iter_mut().zip(d).for_each(|(a, b)| *a += b);
            }
            y
        }
        Backend::Cpu => {
            let mut y = Vec::with_capacity(x.len());
            let stride = 2 * s.inter * h;
            for (t, x_row) in x.chunks_exact(h).enumerate() {
                let mut acc = vec![0f64; h];
                for j in 0..k {
                    let e = ids[t * k + j] as usize;
                    let f = naive::ffn_row(
                        x_row,
                        &w.gate_up[e * stride..(e + 1) * stride],
                        &w.down[e * stride / 2..(e + 1) * stride / 2],
                        s.inter,
                        s.gemma,
                    );
                    acc.iter_mut().zip(f).for_each(|(a, v)| *a += weights[t * k + j] as f64 * v);
                }
                if s.dense_inter > 0 {
                    let f = naive::ffn_row(x_row, &w.dense_gate_up, &w.dense_down, s.dense_inter, s.gemma);
                    let g = w.dense_gate.as_ref().map_or(1.0, |wg| {
                        let z: f64 = x_row.iter().zip(wg).map(|(a, b)| a.to_f64() * b.to_f64()).sum();
                        1.0 / (1.0 + (-(z as f32 as f64)).exp())
                    });
                    acc.iter_mut().zip(f).for_each(|(a, v)| *a += g * v);
                }
                y.extend(acc);
            }
            y
        }
    }
}

const GUARD_BYTES: usize = 256;

/// Runs the block on fresh inputs and compares output and routing with the oracle.
pub fn check_block(ctx: &Context, stream: Stream, c: &BlockCase, seed: u64) -> Result<Outcome> {
    let s = &c.shape;
    let mut rng = Rng::new(seed);
    let w = BlockWeights::random(s, c.routing, &mut rng);
    let dw = DeviceWeights::upload(ctx, &w)?;
    run_block_case(ctx, stream, c, &w, &dw, &mut rng)
}

/// One run of a block case on given weights (the graph test replays with new inputs through this).
pub fn run_block_case(
    ctx: &Context,
    stream: Stream,
    c: &BlockCase,
    w: &BlockWeights,
    dw: &DeviceWeights,
    rng: &mut Rng,
) -> Result<Outcome> {
    let s = &c.shape;
    let (t, h) = (c.tokens, s.hidden);
    let stride = h + c.pad;
    let mut x = rng.bf16_normal(t * stride, 1.0);
    if c.nan_token {
        x[5] = bf16::NAN;
    }
    let existing = rng.bf16_normal(t * stride, 1.0);
    let x_buf = TestBuffer::from_slice(ctx, &x)?;
    let out_buf = TestBuffer::new(ctx, t * stride * 2)?;
    out_buf.poison()?;
    if c.accumulate {
        let mut init: Vec<u16> = vec![0xffff; t * stride];
        for r in 0..t {
            for i in 0..h {
                init[r * stride + i] = existing[r * stride + i].to_bits();
            }
        }
        out_buf.upload(&init)?;
    }
    let ws_bytes = s.block_layout(t)?.total();
    let ws = TestBuffer::new(ctx, ws_bytes + GUARD_BYTES)?;
    ws.poison()?;
    let args = dw.block_args(s, t, (x_buf.ptr(), stride), (out_buf.ptr(), stride), c.accumulate, (ws.ptr(), ws_bytes));
    // Every address is a buffer allocated above with the extent the arguments describe.
    unsafe { ops::moe_forward(ctx, &args, stream)? };
    stream.synchronize(ctx)?;
    compare_block(ctx, c, w, &x, &existing, &out_buf, &ws, ws_bytes)
}

/// Compares a finished block run (output in `out_buf`, routing in `ws`) with the oracle.
pub fn compare_block(
    ctx: &Context,
    c: &BlockCase,
    w: &BlockWeights,
    x: &[bf16],
    existing: &[bf16],
    out_buf: &TestBuffer,
    ws: &TestBuffer,
    ws_bytes: usize,
) -> Result<Outcome> {
    let s = &c.shape;
    let (t, h, e, k) = (c.tokens, s.hidden, s.experts, s.top_k);
    let stride = h + c.pad;
    let x_dense = super::dense_rows(x, t, h, stride);
    let existing_dense = super::dense_rows(existing, t, h, stride);
    let out_raw: Vec<u16> = out_buf.download(t * stride)?;
    let mut stray_writes = super::padding_writes(&out_raw, t, h, stride);
    let guard: Vec<u8> = ws.download(ws_bytes + GUARD_BYTES)?;
    stray_writes += guard[ws_bytes..].iter().filter(|&&b| b != 0xff).count();
    let out: Vec<f32> =
        super::dense_rows(&out_raw.iter().map(|&b| bf16::from_bits(b)).collect::<Vec<_>>(), t, h, stride)
            .iter()
            .map(|v| v.to_f32())
            .collect();

    let got = read_routing(ws, s, t)?;
    let mut mismatches = Vec::new();
    // Values are compared on a sample of at most 64 tokens (the f64 oracle of thousands of tokens takes
    // minutes); the routing of every token is compared exactly. Tokens whose input holds a NaN are left
    // out of the value comparisons: their outputs are NaN by definition.
    let step = t.div_ceil(64);
    let sel: Vec<usize> =
        (0..t).filter(|&r| r % step == 0 && x_dense[r * h..(r + 1) * h].iter().all(|v| v.is_finite())).collect();
    let rows =
        |v: &[f32], n: usize| sel.iter().flat_map(|&r| v[r * n..(r + 1) * n].iter().copied()).collect::<Vec<_>>();
    let x_sel: Vec<bf16> = sel.iter().flat_map(|&r| x_dense[r * h..(r + 1) * h].iter().copied()).collect();

    let scale_ref = w.input_scale.as_deref().map(|sc| RouterTransform { scale: sc, eps: 1e-6 });
    let want_logits: Vec<f32> = match ctx.backend() {
        Backend::Cuda(_) => refmoe::router_logits(&x_sel, sel.len(), h, &w.router, e, scale_ref),
        Backend::Cpu => x_sel
            .chunks_exact(h)
            .flat_map(|row| {
                naive::router_row(row, &w.router, e, w.input_scale.as_deref().map(|sc| (sc, 1e-6)))
                    .into_iter()
                    .map(|v| v as f32)
            })
            .collect(),
    };
    let logits = Comparison::new(&rows(&got.logits, e), &want_logits);

    let cfg =
        TopkConfig { top_k: k, scoring: Scoring::Softmax, renormalize: true, expert_scale: w.expert_scale.as_deref() };
    let refmoe::Routing { ids, weights, counts, offsets, sorted_slots: sorted } =
        oracle_routing(ctx, &got.logits, t, e, &cfg, false);
    exact("topk_ids", &got.ids, &ids, &mut mismatches);
    exact("expert_counts", &got.counts, &counts, &mut mismatches);
    exact("expert_offsets", &got.offsets, &offsets, &mut mismatches);
    exact("sorted_slots", &got.sorted, &sorted, &mut mismatches);
    let weights_cmp = Comparison::new(&rows(&got.weights, k), &rows(&weights, k));

    let ids_sel: Vec<i32> = sel.iter().flat_map(|&r| ids[r * k..(r + 1) * k].iter().copied()).collect();
    let mut want = oracle_output(ctx, s, w, &x_sel, &ids_sel, &rows(&weights, k));
    if c.accumulate {
        let existing_sel = sel.iter().flat_map(|&r| existing_dense[r * h..(r + 1) * h].iter());
        want.iter_mut().zip(existing_sel).for_each(|(a, b)| *a += b.to_f64());
    }
    let want: Vec<f32> = want.iter().map(|&v| bf16::from_f64(v).to_f32()).collect();
    Ok(Outcome {
        out: Comparison::new(&rows(&out, h), &want),
        logits: Some(logits),
        weights: Some(weights_cmp),
        mismatches,
        stray_writes,
    })
}

/// How the logits of a top-k case are made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitPattern {
    Random,
    /// All equal: experts 0..k−1 for every token.
    Tied,
    /// Every token prefers the same k experts (in a random order): k experts get all tokens.
    Concentrated,
    /// Random with NaN and ±∞ sprinkled in.
    NonFinite,
}

#[derive(Clone, Copy, Debug)]
pub struct TopkCase {
    pub tokens: usize,
    pub experts: usize,
    pub top_k: usize,
    pub pattern: LogitPattern,
    pub scoring: Scoring,
    pub renormalize: bool,
    pub expert_scale: bool,
}

/// The top-k router alone on constructed logits; ids, counts, offsets and slots exact.
pub fn check_topk(ctx: &Context, stream: Stream, c: &TopkCase, seed: u64) -> Result<Outcome> {
    let mut rng = Rng::new(seed);
    let (t, e, k) = (c.tokens, c.experts, c.top_k);
    let favoured: Vec<usize> = (0..k).map(|j| (j * 37 + 11) % e).collect();
    let logits: Vec<f32> = (0..t * e)
        .map(|i| match c.pattern {
            LogitPattern::Random => 3.0 * rng.normal(),
            LogitPattern::Tied => 0.25,
            LogitPattern::Concentrated => {
                if favoured.contains(&(i % e)) {
                    10.0 + rng.uniform()
                } else {
                    rng.normal()
                }
            }
            LogitPattern::NonFinite => match rng.next_u64() % 16 {
                0 => f32::NAN,
                1 => f32::INFINITY,
                2 => f32::NEG_INFINITY,
                _ => rng.normal(),
            },
        })
        .collect();
    let scale: Vec<f32> = (0..e).map(|_| rng.range(0.5, 1.5)).collect();
    let logits_buf = TestBuffer::from_slice(ctx, &logits)?;
    let scale_buf = TestBuffer::from_slice(ctx, &scale)?;
    // One buffer with a poisoned guard after each output.
    let sizes = [t * k * 4, t * k * 4, e * 4, (e + 1) * 4, t * k * 4];
    let pitch: Vec<usize> = sizes.iter().map(|b| (b + GUARD_BYTES).div_ceil(256) * 256).collect();
    let out_buf = TestBuffer::new(ctx, pitch.iter().sum())?;
    out_buf.poison()?;
    let base: Vec<u64> = (0..5).map(|i| out_buf.ptr() + pitch[..i].iter().sum::<usize>() as u64).collect();
    let args = TopkArgs {
        logits: logits_buf.ptr(),
        logits_row_stride: 0,
        tokens: t as i64,
        experts: e as i64,
        top_k: k as i64,
        scoring: c.scoring,
        renormalize: c.renormalize,
        expert_scale: if c.expert_scale { scale_buf.ptr() } else { 0 },
        topk_ids: base[0],
        topk_weights: base[1],
        expert_counts: base[2],
        expert_offsets: base[3],
        sorted_slots: base[4],
    };
    // Every address lies in a buffer allocated above with room for its extent.
    unsafe { ops::topk_router(ctx, &args, stream)? };
    stream.synchronize(ctx)?;
    let raw: Vec<u8> = out_buf.download(pitch.iter().sum())?;
    let mut at = 0;
    let mut stray_writes = 0;
    let mut parts: Vec<Vec<u32>> = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        parts.push(raw[at..at + n].chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().unwrap())).collect());
        stray_writes += raw[at + n..at + pitch[i]].iter().filter(|&&b| b != 0xff).count();
        at += pitch[i];
    }
    let as_i32 = |v: &[u32]| v.iter().map(|&b| b as i32).collect::<Vec<_>>();
    let got_w: Vec<f32> = parts[1].iter().map(|&b| f32::from_bits(b)).collect();
    let cfg = TopkConfig {
        top_k: k,
        scoring: c.scoring,
        renormalize: c.renormalize,
        expert_scale: c.expert_scale.then_some(&scale[..]),
    };
    let refmoe::Routing { ids, weights, counts, offsets, sorted_slots: sorted } =
        oracle_routing(ctx, &logits, t, e, &cfg, c.scoring == Scoring::Sigmoid);
    let mut mismatches = Vec::new();
    exact("topk_ids", &as_i32(&parts[0]), &ids, &mut mismatches);
    exact("expert_counts", &as_i32(&parts[2]), &counts, &mut mismatches);
    exact("expert_offsets", &as_i32(&parts[3]), &offsets, &mut mismatches);
    exact("sorted_slots", &as_i32(&parts[4]), &sorted, &mut mismatches);
    let weights_cmp = if c.pattern == LogitPattern::NonFinite {
        // Non-finite logits make their token's weights NaN on both sides; the rest must agree.
        let keep: Vec<usize> = (0..t * k).filter(|&i| weights[i].is_finite()).collect();
        let nan_mismatch = (0..t * k).filter(|&i| weights[i].is_finite() != got_w[i].is_finite()).count();
        if nan_mismatch > 0 {
            mismatches.push(format!("topk_weights: {nan_mismatch} weights differ in finiteness"));
        }
        Comparison::new(
            &keep.iter().map(|&i| got_w[i]).collect::<Vec<_>>(),
            &keep.iter().map(|&i| weights[i]).collect::<Vec<_>>(),
        )
    } else {
        Comparison::new(&got_w, &weights)
    };
    Ok(Outcome { out: weights_cmp, logits: None, weights: None, mismatches, stray_writes })
}

/// A workspace of `bytes` and GUARD_BYTES past it, every byte poisoned (0xff).
fn guarded_workspace(ctx: &Context, bytes: usize) -> Result<TestBuffer<'_>> {
    let ws = TestBuffer::new(ctx, bytes + GUARD_BYTES)?;
    ws.poison()?;
    Ok(ws)
}

/// Runs expert_ffn and reads back `elems` outputs and the count of bytes written into the guard past the
/// workspace (`ws` holds `args.workspace_bytes` + GUARD_BYTES, poisoned).
///
/// # Safety
/// Every address in `args` is a buffer of the context with the extent the arguments describe.
unsafe fn run_expert_ffn(
    ctx: &Context,
    stream: Stream,
    args: &ExpertFfnArgs,
    out: &TestBuffer,
    ws: &TestBuffer,
    elems: usize,
) -> Result<(Vec<f32>, usize)> {
    unsafe { ops::expert_ffn(ctx, args, stream)? };
    stream.synchronize(ctx)?;
    let out: Vec<f32> = reference::to_f32(&out.download::<bf16>(elems)?);
    let guard: Vec<u8> = ws.download(args.workspace_bytes + GUARD_BYTES)?;
    Ok((out, guard[args.workspace_bytes..].iter().filter(|&&b| b != 0xff).count()))
}

/// The dense FFN alone (expert_ffn without routed experts), accumulating into an existing output.
pub fn check_dense(ctx: &Context, stream: Stream, s: &MoeShape, tokens: usize, seed: u64) -> Result<Outcome> {
    let mut rng = Rng::new(seed);
    let w = BlockWeights::random(&s.with_experts(1), RoutingPattern::Random, &mut rng);
    let h = s.hidden;
    let x = rng.bf16_normal(tokens * h, 1.0);
    let existing = rng.bf16_normal(tokens * h, 1.0);
    let x_buf = TestBuffer::from_slice(ctx, &x)?;
    let out_buf = TestBuffer::from_slice(ctx, &existing)?;
    let gu = TestBuffer::from_slice(ctx, &w.dense_gate_up)?;
    let dn = TestBuffer::from_slice(ctx, &w.dense_down)?;
    let gate = w.dense_gate.as_ref().map(|g| TestBuffer::from_slice(ctx, g)).transpose()?;
    let ws_bytes = ops::expert_ffn_workspace_size(tokens as i64, s.hidden as i64, 0, 0, s.dense_inter as i64)?;
    let ws = guarded_workspace(ctx, ws_bytes)?;
    let args = ExpertFfnArgs {
        x: x_buf.ptr(),
        x_row_stride: 0,
        out: out_buf.ptr(),
        out_row_stride: 0,
        accumulate: true,
        tokens: tokens as i64,
        hidden: h as i64,
        activation: s.activation(),
        routed: None,
        dense: Some(DenseFfn {
            gate_up: gu.ptr(),
            down: dn.ptr(),
            inter: s.dense_inter as i64,
            gate_weight: gate.as_ref().map_or(0, |g| g.ptr()),
        }),
        workspace: ws.ptr(),
        workspace_bytes: ws_bytes,
    };
    // Every address is a buffer allocated above with the extent the arguments describe.
    let (out, stray_writes) = unsafe { run_expert_ffn(ctx, stream, &args, &out_buf, &ws, tokens * h)? };
    let shape = MoeShape { top_k: 0, ..*s };
    let mut want = oracle_output_dense(ctx, &shape, &w, &x);
    want.iter_mut().zip(&existing).for_each(|(a, b)| *a += b.to_f64());
    let want: Vec<f32> = want.iter().map(|&v| bf16::from_f64(v).to_f32()).collect();
    Ok(Outcome { out: Comparison::new(&out, &want), logits: None, weights: None, mismatches: Vec::new(), stray_writes })
}

/// The expert FFN (routed experts and the dense FFN) with routing the caller built: `ids` is [tokens, top_k]
/// and may name an expert twice for a token, whose two slots are then two terms of its sum, as in the
/// reference; the expert index is built here on the host, the weights are random.
pub fn check_given_routing(ctx: &Context, stream: Stream, s: &MoeShape, ids: &[i32], seed: u64) -> Result<Outcome> {
    let mut rng = Rng::new(seed);
    let w = BlockWeights::random(s, RoutingPattern::Random, &mut rng);
    let (h, k) = (s.hidden, s.top_k);
    let tokens = ids.len() / k;
    let x = rng.bf16_normal(tokens * h, 1.0);
    let weights: Vec<f32> = (0..ids.len()).map(|_| rng.range(0.1, 1.0)).collect();
    let (_, offsets, sorted) = naive::index(ids, s.experts);
    let dw = DeviceWeights::upload(ctx, &w)?;
    let x_buf = TestBuffer::from_slice(ctx, &x)?;
    let out_buf = TestBuffer::new(ctx, tokens * h * 2)?;
    out_buf.poison()?;
    let ids_buf = TestBuffer::from_slice(ctx, ids)?;
    let weights_buf = TestBuffer::from_slice(ctx, &weights)?;
    let offsets_buf = TestBuffer::from_slice(ctx, &offsets)?;
    let sorted_buf = TestBuffer::from_slice(ctx, &sorted)?;
    let ws_bytes =
        ops::expert_ffn_workspace_size(tokens as i64, h as i64, k as i64, s.inter as i64, s.dense_inter as i64)?;
    let ws = guarded_workspace(ctx, ws_bytes)?;
    // The block's expert FFN arguments, with this routing in place of the block's own.
    let mut args = dw.block_args(s, tokens, (x_buf.ptr(), 0), (out_buf.ptr(), 0), false, (ws.ptr(), ws_bytes)).ffn;
    if let Some(r) = args.routed.as_mut() {
        r.topk_ids = ids_buf.ptr();
        r.topk_weights = weights_buf.ptr();
        r.expert_offsets = offsets_buf.ptr();
        r.sorted_slots = sorted_buf.ptr();
    }
    // Every address is a buffer allocated above with the extent the arguments describe.
    let (out, stray_writes) = unsafe { run_expert_ffn(ctx, stream, &args, &out_buf, &ws, tokens * h)? };
    let want: Vec<f32> =
        oracle_output(ctx, s, &w, &x, ids, &weights).iter().map(|&v| bf16::from_f64(v).to_f32()).collect();
    Ok(Outcome { out: Comparison::new(&out, &want), logits: None, weights: None, mismatches: Vec::new(), stray_writes })
}

fn oracle_output_dense(ctx: &Context, s: &MoeShape, w: &BlockWeights, x: &[bf16]) -> Vec<f64> {
    oracle_output(ctx, s, w, x, &[], &[])
}

pub fn model_checks(cpu: bool) -> Vec<ModelCheck> {
    let mut checks = Vec::new();
    // The CPU backend keeps to a few experts: its cost is the oracle's f64 loops and the weights' memory.
    let shapes: Vec<MoeShape> =
        if cpu { vec![QWEN35.with_experts(32), GEMMA4.with_experts(16)] } else { vec![QWEN35, GEMMA4] };
    let token_counts: &[usize] = if cpu { &[1, 3] } else { &[1, 2, 7, 16, 17, 64] };
    for s in &shapes {
        for &tokens in token_counts {
            let case = BlockCase {
                shape: *s,
                tokens,
                routing: RoutingPattern::Random,
                accumulate: false,
                pad: 0,
                nan_token: false,
            };
            checks.push(ModelCheck {
                op: "moe_block",
                shape: format!("{} E={} T={tokens}", s.label, s.experts),
                variant: "router+topk+ffn+dense".into(),
                tol: BF16_TOL,
                run: Box::new(move |ctx, stream, seed| Ok(check_block(ctx, stream, &case, seed)?.into_check_result())),
            });
        }
        let tied = BlockCase {
            shape: *s,
            tokens: 5,
            routing: RoutingPattern::Tied,
            accumulate: true,
            pad: 8,
            nan_token: false,
        };
        checks.push(ModelCheck {
            op: "moe_block",
            shape: format!("{} E={} T=5", s.label, s.experts),
            variant: "tied, accumulate, strided".into(),
            tol: BF16_TOL,
            run: Box::new(move |ctx, stream, seed| Ok(check_block(ctx, stream, &tied, seed)?.into_check_result())),
        });
        // A caller's routing that names expert 3 twice for its one token (the single-token gate/up path).
        let routed = s.with_experts(8);
        checks.push(ModelCheck {
            op: "moe_expert_ffn",
            shape: format!("{} E=8 T=1", s.label),
            variant: "given routing, an expert twice".into(),
            tol: BF16_TOL,
            run: Box::new(move |ctx, stream, seed| {
                Ok(check_given_routing(ctx, stream, &routed, &[3, 3, 0, 5, 1, 7, 2, 6], seed)?.into_check_result())
            }),
        });
        let shape = *s;
        checks.push(ModelCheck {
            op: "moe_dense",
            shape: format!("{} I={}", s.label, s.dense_inter),
            variant: if s.gemma { "GeGLU" } else { "SwiGLU, sigmoid gate" }.into(),
            tol: BF16_TOL,
            run: Box::new(move |ctx, stream, seed| Ok(check_dense(ctx, stream, &shape, 2, seed)?.into_check_result())),
        });
    }
    let topk_tokens = if cpu { 9 } else { 100 };
    for (experts, pattern, scoring, renormalize, expert_scale) in [
        (256, LogitPattern::Random, Scoring::Softmax, true, false),
        (128, LogitPattern::Random, Scoring::Softmax, true, true),
        (512, LogitPattern::Concentrated, Scoring::Sigmoid, false, false),
        (64, LogitPattern::Tied, Scoring::Softmax, true, false),
        (256, LogitPattern::NonFinite, Scoring::Softmax, true, false),
    ] {
        let case = TopkCase { tokens: topk_tokens, experts, top_k: 8, pattern, scoring, renormalize, expert_scale };
        checks.push(ModelCheck {
            op: "moe_topk",
            shape: format!("T={topk_tokens} E={experts} k=8"),
            variant: format!("{pattern:?} {scoring:?}{}", if expert_scale { " scaled" } else { "" }),
            tol: F32_TOL,
            run: Box::new(move |ctx, stream, seed| Ok(check_topk(ctx, stream, &case, seed)?.into_check_result())),
        });
    }
    checks
}
