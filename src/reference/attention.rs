//! Decode attention over a KV cache: scores in f32 from f64 dot products, softmax and the weighted sum
//! of V accumulated in f64, one rounding of the output to bf16.

use super::bf16;

/// Shape and options of a decode-attention problem.
#[derive(Clone, Copy, Debug)]
pub struct DecodeProblem {
    pub batch: usize,
    /// New query tokens per sequence (Tq).
    pub q_len: usize,
    pub num_q_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Each query attends only the last `window` positions up to its own.
    pub window: Option<usize>,
    /// Mask keys after the query's own position (only matters among the new tokens).
    pub causal: bool,
    pub scale: f32,
    pub softcap: Option<f32>,
}

/// Whether key position `j` is visible to a query at position `pos` (which may be negative when a
/// sequence holds fewer tokens than there are new queries: it then sees nothing under causal masking).
pub fn visible(j: usize, pos: i64, window: Option<usize>, causal: bool) -> bool {
    let j = j as i64;
    (!causal || j <= pos) && window.is_none_or(|w| j > pos - w as i64)
}

/// `out[b, t, h] = Σ_j softmax_j(s_j) · v[b, j, h / group]` with
/// `s_j = softcap(scale · q[b, t, h] · k[b, j, h / group])` over the visible keys (see [`visible`]), the
/// query of token t sitting at position `len_b − q_len + t`.
///
/// `q` and `out` are dense [batch, q_len, num_q_heads, head_dim]; `k[b]` and `v[b]` hold sequence b's
/// cache as dense [len_b, num_kv_heads, head_dim] (its length is theirs). `lse` [batch, q_len, num_q_heads]
/// receives `max s + ln Σ exp(s_j − max s)`; a row with no visible key gets zeros and lse = −∞.
pub fn decode(p: &DecodeProblem, q: &[bf16], k: &[Vec<bf16>], v: &[Vec<bf16>], out: &mut [bf16], lse: &mut [f32]) {
    let d = p.head_dim;
    let group = p.num_q_heads / p.num_kv_heads;
    let rows = p.batch * p.q_len * p.num_q_heads;
    assert!(q.len() == rows * d && out.len() == rows * d && lse.len() == rows);
    assert!(k.len() == p.batch && v.len() == p.batch && p.num_q_heads.is_multiple_of(p.num_kv_heads));
    let mut scores: Vec<f32> = Vec::new();
    let mut acc = vec![0f64; d];
    for b in 0..p.batch {
        let stride = p.num_kv_heads * d;
        let len = k[b].len() / stride;
        assert_eq!(v[b].len(), len * stride, "k and v of sequence {b} differ in length");
        for t in 0..p.q_len {
            let pos = len as i64 - p.q_len as i64 + t as i64;
            for h in 0..p.num_q_heads {
                let kv = h / group;
                let row = (b * p.q_len + t) * p.num_q_heads + h;
                let qr: Vec<f32> = q[row * d..(row + 1) * d].iter().map(|x| x.to_f32()).collect();
                scores.clear();
                let mut max = f32::NEG_INFINITY;
                for j in 0..len {
                    if !visible(j, pos, p.window, p.causal) {
                        scores.push(f32::NEG_INFINITY);
                        continue;
                    }
                    let kr = &k[b][j * stride + kv * d..j * stride + (kv + 1) * d];
                    let dot: f64 = qr.iter().zip(kr).map(|(&a, c)| a as f64 * c.to_f32() as f64).sum();
                    let mut s = dot as f32 * p.scale;
                    if let Some(cap) = p.softcap {
                        s = cap * (s / cap).tanh();
                    }
                    max = max.max(s);
                    scores.push(s);
                }
                let o = &mut out[row * d..(row + 1) * d];
                if max == f32::NEG_INFINITY {
                    o.fill(bf16::ZERO);
                    lse[row] = f32::NEG_INFINITY;
                    continue;
                }
                acc.fill(0.0);
                let mut denom = 0f64;
                for (j, &s) in scores.iter().enumerate() {
                    if s == f32::NEG_INFINITY {
                        continue;
                    }
                    let w = ((s - max) as f64).exp();
                    denom += w;
                    let vr = &v[b][j * stride + kv * d..j * stride + (kv + 1) * d];
                    for (a, x) in acc.iter_mut().zip(vr) {
                        *a += w * x.to_f32() as f64;
                    }
                }
                for (ov, a) in o.iter_mut().zip(&acc) {
                    *ov = bf16::from_f64(a / denom);
                }
                lse[row] = (max as f64 + denom.ln()) as f32;
            }
        }
    }
}
