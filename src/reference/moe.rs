//! Mixture-of-Experts block: router GEMM (with Gemma 4's optional input transform), top-k routing and the
//! expert index, routed expert FFNs (SwiGLU / GeGLU-tanh) and the dense or shared FFN.
//!
//! Definitions the kernels follow exactly:
//! - Top-k ranks the raw fp32 logits (softmax and sigmoid are monotonic); NaN ranks as −∞; ties go to the
//!   lower expert index.
//! - An FFN's intermediate `act(g) · u` is computed from fp32 `g` and `u` and rounded to bf16 once (the
//!   kernels keep it in bf16 between the two projections).
//! - The block output is `bf16(Σ_j w_j · down_e(h) + gate · dense(x) [+ out])`, one rounding at the end.

use super::bf16;

/// How router logits become scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scoring {
    /// Softmax over all experts (Qwen3.5, Gemma 4).
    Softmax,
    /// Independent sigmoid per expert.
    Sigmoid,
}

/// The gated FFN's activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `silu(g) · u` (Qwen3.5).
    Silu,
    /// `gelu_tanh(g) · u` (Gemma 4).
    GeluTanh,
}

impl Activation {
    pub fn apply(self, g: f32) -> f32 {
        match self {
            Activation::Silu => g / (1.0 + (-g).exp()),
            Activation::GeluTanh => {
                let k0 = 0.797_884_6_f32;
                0.5 * g * (1.0 + (k0 * (g + 0.044715 * g * g * g)).tanh())
            }
        }
    }
}

fn dot(a: &[bf16], b: &[bf16]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x.to_f64() * y.to_f64()).sum()
}

/// Gemma 4's router input transform: `RMSNorm-without-weight(x) · scale · H^-0.5`, kept in fp32.
#[derive(Clone, Copy, Debug)]
pub struct RouterTransform<'a> {
    /// bf16 [H].
    pub scale: &'a [bf16],
    pub eps: f32,
}

/// `logits[T, E] = f(x)[T, H] · Wr[E, H]ᵀ` in fp32, with `f` the optional transform.
pub fn router_logits(
    x: &[bf16],
    tokens: usize,
    hidden: usize,
    w: &[bf16],
    experts: usize,
    transform: Option<RouterTransform>,
) -> Vec<f32> {
    assert!(x.len() == tokens * hidden && w.len() == experts * hidden);
    let mut logits = vec![0f32; tokens * experts];
    for (t, x_row) in x.chunks_exact(hidden).enumerate() {
        let input: Vec<f64> = match transform {
            None => x_row.iter().map(|v| v.to_f64()).collect(),
            Some(tr) => {
                assert_eq!(tr.scale.len(), hidden);
                let ms = x_row.iter().map(|v| v.to_f64() * v.to_f64()).sum::<f64>() / hidden as f64;
                let factor = 1.0 / (ms + tr.eps as f64).sqrt() / (hidden as f64).sqrt();
                x_row.iter().zip(tr.scale).map(|(v, s)| v.to_f64() * s.to_f64() * factor).collect()
            }
        };
        for (e, w_row) in w.chunks_exact(hidden).enumerate() {
            logits[t * experts + e] = w_row.iter().zip(&input).map(|(a, b)| a.to_f64() * b).sum::<f64>() as f32;
        }
    }
    logits
}

/// Top-k routing options.
#[derive(Clone, Copy, Debug)]
pub struct TopkConfig<'a> {
    pub top_k: usize,
    pub scoring: Scoring,
    /// Divide the selected scores by their sum.
    pub renormalize: bool,
    /// fp32 [E] multiplied into the final weights (Gemma 4's per_expert_scale).
    pub expert_scale: Option<&'a [f32]>,
}

/// Routing of T tokens: slot `t·k + j` is token t's j-th choice.
#[derive(Clone, Debug, PartialEq)]
pub struct Routing {
    /// [T, k], best first.
    pub ids: Vec<i32>,
    /// [T, k].
    pub weights: Vec<f32>,
    /// [E]: slots per expert.
    pub counts: Vec<i32>,
    /// [E + 1]: exclusive scan of `counts`.
    pub offsets: Vec<i32>,
    /// [T·k]: slots grouped by ascending expert, ascending slot inside an expert.
    pub sorted_slots: Vec<i32>,
}

/// The rank key of a logit: NaN ranks as −∞.
fn rank_key(v: f32) -> f32 {
    if v.is_nan() {
        f32::NEG_INFINITY
    } else {
        v
    }
}

pub fn topk_router(logits: &[f32], tokens: usize, experts: usize, cfg: &TopkConfig) -> Routing {
    let k = cfg.top_k;
    assert!(logits.len() == tokens * experts && k >= 1 && k <= experts);
    let mut ids = Vec::with_capacity(tokens * k);
    let mut weights = Vec::with_capacity(tokens * k);
    for row in logits.chunks_exact(experts) {
        let mut order: Vec<usize> = (0..experts).collect();
        // Stable sort by descending key keeps lower indices first among ties.
        order.sort_by(|&a, &b| rank_key(row[b]).total_cmp(&rank_key(row[a])));
        let chosen = &order[..k];
        let scores: Vec<f64> = match cfg.scoring {
            Scoring::Softmax => {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                let sum: f64 = row.iter().map(|&l| (l as f64 - max).exp()).sum();
                chosen.iter().map(|&e| (row[e] as f64 - max).exp() / sum).collect()
            }
            Scoring::Sigmoid => chosen.iter().map(|&e| 1.0 / (1.0 + (-(row[e] as f64)).exp())).collect(),
        };
        let total: f64 = if cfg.renormalize { scores.iter().sum() } else { 1.0 };
        for (&e, s) in chosen.iter().zip(&scores) {
            let scale = cfg.expert_scale.map_or(1.0, |sc| sc[e] as f64);
            ids.push(e as i32);
            weights.push((s / total * scale) as f32);
        }
    }
    let (counts, offsets, sorted_slots) = expert_index(&ids, experts);
    Routing { ids, weights, counts, offsets, sorted_slots }
}

/// Counts, exclusive offsets and the expert-grouped slot order of `ids` (every id must be < `experts`).
pub fn expert_index(ids: &[i32], experts: usize) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
    let mut counts = vec![0i32; experts];
    for &e in ids {
        counts[e as usize] += 1;
    }
    let mut offsets = vec![0i32; experts + 1];
    for e in 0..experts {
        offsets[e + 1] = offsets[e] + counts[e];
    }
    let mut next = offsets.clone();
    let mut sorted = vec![0i32; ids.len()];
    for (s, &e) in ids.iter().enumerate() {
        sorted[next[e as usize] as usize] = s as i32;
        next[e as usize] += 1;
    }
    (counts, offsets, sorted)
}

/// One gated FFN's weights: gate and up fused as `[2I, H]` (gate rows first), down `[H, I]`.
#[derive(Clone, Copy, Debug)]
pub struct FfnWeights<'a> {
    pub gate_up: &'a [bf16],
    pub down: &'a [bf16],
    pub inter: usize,
}

impl<'a> FfnWeights<'a> {
    /// Expert `e` of stacked weights `[E, 2I, H]` / `[E, H, I]`.
    pub fn expert(gate_up: &'a [bf16], down: &'a [bf16], inter: usize, hidden: usize, e: usize) -> Self {
        let n = 2 * inter * hidden;
        FfnWeights { gate_up: &gate_up[e * n..(e + 1) * n], down: &down[e * n / 2..(e + 1) * n / 2], inter }
    }

    /// `down(bf16(act(gate · x) · (up · x)))` for one token, unrounded.
    pub fn apply(&self, x: &[bf16], act: Activation) -> Vec<f64> {
        let hidden = x.len();
        let i = self.inter;
        let h: Vec<bf16> = (0..i)
            .map(|r| {
                let g = dot(&self.gate_up[r * hidden..(r + 1) * hidden], x) as f32;
                let u = dot(&self.gate_up[(i + r) * hidden..(i + r + 1) * hidden], x) as f32;
                bf16::from_f32(act.apply(g) * u)
            })
            .collect();
        self.down.chunks_exact(i).map(|row| dot(row, &h)).collect()
    }
}

/// `Σ_j w_tj · FFN_{e_tj}(x_t)` for every token, in f64 (unrounded) `[T, H]`.
pub fn expert_ffn(
    x: &[bf16],
    hidden: usize,
    gate_up: &[bf16],
    down: &[bf16],
    inter: usize,
    ids: &[i32],
    weights: &[f32],
    top_k: usize,
    act: Activation,
) -> Vec<f64> {
    let tokens = x.len() / hidden;
    assert!(ids.len() == tokens * top_k && weights.len() == ids.len());
    let mut y = vec![0f64; tokens * hidden];
    for t in 0..tokens {
        let x_row = &x[t * hidden..(t + 1) * hidden];
        for j in 0..top_k {
            let s = t * top_k + j;
            let f = FfnWeights::expert(gate_up, down, inter, hidden, ids[s] as usize).apply(x_row, act);
            for (o, v) in y[t * hidden..(t + 1) * hidden].iter_mut().zip(f) {
                *o += weights[s] as f64 * v;
            }
        }
    }
    y
}

/// The dense FFN (Gemma 4) or the shared expert (Qwen3.5, with `gate` = w_sg: output × sigmoid(x · w_sg)),
/// in f64 (unrounded) `[T, H]`.
pub fn dense_ffn(x: &[bf16], hidden: usize, w: &FfnWeights, gate: Option<&[bf16]>, act: Activation) -> Vec<f64> {
    let mut y = Vec::with_capacity(x.len());
    for x_row in x.chunks_exact(hidden) {
        let g = gate.map_or(1.0, |wg| {
            let z = dot(x_row, wg) as f32;
            1.0 / (1.0 + (-z).exp())
        }) as f64;
        y.extend(w.apply(x_row, act).into_iter().map(|v| v * g));
    }
    y
}

/// A whole MoE block's weights and options.
#[derive(Clone, Copy, Debug)]
pub struct MoeBlock<'a> {
    pub hidden: usize,
    pub experts: usize,
    /// bf16 [E, H].
    pub router: &'a [bf16],
    pub transform: Option<RouterTransform<'a>>,
    pub topk: TopkConfig<'a>,
    /// [E, 2I, H] and [E, H, I].
    pub gate_up: &'a [bf16],
    pub down: &'a [bf16],
    pub inter: usize,
    pub dense: Option<FfnWeights<'a>>,
    /// Gate vector of the dense FFN (Qwen3.5's shared expert).
    pub dense_gate: Option<&'a [bf16]>,
    pub act: Activation,
}

/// Combines f64 parts (and an existing output) into the bf16 output with one rounding.
pub fn combine(parts: &[&[f64]], existing: Option<&[bf16]>) -> Vec<bf16> {
    let n = parts[0].len();
    (0..n)
        .map(|i| {
            let mut v: f64 = parts.iter().map(|p| p[i]).sum();
            if let Some(e) = existing {
                v += e[i].to_f64();
            }
            bf16::from_f64(v)
        })
        .collect()
}

/// The block: router → top-k → routed experts + dense FFN; returns the output and the routing.
pub fn moe_block(x: &[bf16], b: &MoeBlock, existing: Option<&[bf16]>) -> (Vec<bf16>, Routing) {
    let tokens = x.len() / b.hidden;
    let logits = router_logits(x, tokens, b.hidden, b.router, b.experts, b.transform);
    let routing = topk_router(&logits, tokens, b.experts, &b.topk);
    let routed =
        expert_ffn(x, b.hidden, b.gate_up, b.down, b.inter, &routing.ids, &routing.weights, b.topk.top_k, b.act);
    let out = match &b.dense {
        Some(d) => combine(&[&routed, &dense_ffn(x, b.hidden, d, b.dense_gate, b.act)], existing),
        None => combine(&[&routed], existing),
    };
    (out, routing)
}
