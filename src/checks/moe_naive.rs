//! Independent f64 formulas of the MoE block, written from the model definitions without sharing code with
//! `reference::moe`: the oracle of the reference's own tests and of `sparkinfer check` on the CPU backend.
//! Selection here is repeated arg-max (the reference sorts), softmax is the explicit formula.

use crate::reference::bf16;

fn f(v: bf16) -> f64 {
    v.to_f64()
}

/// Router logits of one token; `scale` enables `x / rms(x) · scale / sqrt(H)`.
pub fn router_row(x: &[bf16], w: &[bf16], experts: usize, scale: Option<(&[bf16], f64)>) -> Vec<f64> {
    let h = x.len();
    let mut input: Vec<f64> = x.iter().map(|&v| f(v)).collect();
    if let Some((s, eps)) = scale {
        let rms = (input.iter().map(|v| v * v).sum::<f64>() / h as f64 + eps).sqrt();
        for (i, v) in input.iter_mut().enumerate() {
            *v = *v / rms * f(s[i]) / (h as f64).sqrt();
        }
    }
    (0..experts).map(|e| (0..h).map(|i| f(w[e * h + i]) * input[i]).sum()).collect()
}

/// Top-k of one token's fp32 logits by repeated arg-max (first maximum wins; NaN counts as −∞), then
/// scores, renormalisation and per-expert scale. Returns (ids, weights).
pub fn topk_row(
    logits: &[f32],
    k: usize,
    sigmoid: bool,
    renormalize: bool,
    expert_scale: Option<&[f32]>,
) -> (Vec<usize>, Vec<f64>) {
    let key = |v: f32| if v.is_nan() { f64::NEG_INFINITY } else { v as f64 };
    let mut taken = vec![false; logits.len()];
    let mut ids = Vec::new();
    for _ in 0..k {
        let mut best: Option<usize> = None;
        for e in 0..logits.len() {
            if !taken[e] && best.is_none_or(|b| key(logits[e]) > key(logits[b])) {
                best = Some(e);
            }
        }
        let b = best.expect("k <= experts");
        taken[b] = true;
        ids.push(b);
    }
    let scores: Vec<f64> = if sigmoid {
        ids.iter().map(|&e| 1.0 / (1.0 + (-(logits[e] as f64)).exp())).collect()
    } else {
        let m = logits.iter().filter(|v| !v.is_nan()).fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
        let denom: f64 = logits.iter().map(|&l| (l as f64 - m).exp()).sum();
        ids.iter().map(|&e| (logits[e] as f64 - m).exp() / denom).collect()
    };
    let total: f64 = if renormalize { scores.iter().sum() } else { 1.0 };
    let weights =
        ids.iter().zip(&scores).map(|(&e, s)| s / total * expert_scale.map_or(1.0, |sc| sc[e] as f64)).collect();
    (ids, weights)
}

/// One gated FFN on one token: `down · bf16(act(g) · u)` with g, u rounded to fp32 first.
pub fn ffn_row(x: &[bf16], gate_up: &[bf16], down: &[bf16], inter: usize, gelu: bool) -> Vec<f64> {
    let h = x.len();
    let mut mid = vec![0f64; inter];
    for (r, m) in mid.iter_mut().enumerate() {
        let g = (0..h).map(|i| f(gate_up[r * h + i]) * f(x[i])).sum::<f64>() as f32 as f64;
        let u = (0..h).map(|i| f(gate_up[(inter + r) * h + i]) * f(x[i])).sum::<f64>() as f32 as f64;
        let a = if gelu {
            0.5 * g * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (g + 0.044715 * g.powi(3))).tanh())
        } else {
            g / (1.0 + (-g).exp())
        };
        *m = bf16::from_f64(a * u).to_f64();
    }
    (0..h).map(|n| (0..inter).map(|i| f(down[n * inter + i]) * mid[i]).sum()).collect()
}

/// Counts and exclusive offsets of `ids` over `experts`, and the slots grouped by expert (stable).
pub fn index(ids: &[i32], experts: usize) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
    let counts: Vec<i32> = (0..experts).map(|e| ids.iter().filter(|&&i| i as usize == e).count() as i32).collect();
    let offsets: Vec<i32> = (0..=experts).map(|e| counts[..e].iter().sum()).collect();
    let sorted: Vec<i32> =
        (0..experts).flat_map(|e| (0..ids.len()).filter(move |&s| ids[s] as usize == e).map(|s| s as i32)).collect();
    (counts, offsets, sorted)
}
