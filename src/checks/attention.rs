//! Checks of decode attention: random caches in every supported layout, positions the op must not read
//! poisoned with NaN, outputs poisoned, compared with `reference` (CUDA) or the naive f64 formula below
//! (CPU backend, whose op is the reference itself).

use super::{dense_rows, f32s, padding_writes, CheckResult, ModelCheck};
use crate::error::Result;
use crate::ops::attention::{self, CacheLayout, CacheTensor, DecodeArgs};
use crate::ops::{Backend, Context, Stream};
use crate::reference::{attention as refattn, bf16};
use crate::testing::{Comparison, Rng, TestBuffer, BF16_TOL};

/// How the test lays the cache out in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// [batch, capacity, kv_heads, head_dim + pad] (llama.cpp style), `pad` extra elements per head row.
    TokenMajor { pad: usize },
    /// [batch, kv_heads, capacity, head_dim].
    HeadMajor,
    /// Pages of `page_size` tokens [num_pages, page_size, kv_heads, head_dim], assigned in shuffled order.
    Paged { page_size: usize },
}

#[derive(Clone, Debug)]
pub struct DecodeCase {
    pub q_len: usize,
    pub num_q_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// One per sequence (the batch size is their count); each at most `max_seq_len`.
    pub lens: Vec<i32>,
    pub max_seq_len: usize,
    pub window: Option<usize>,
    pub causal: bool,
    pub scale: f32,
    pub softcap: Option<f32>,
    pub layout: Layout,
    pub lse: bool,
    /// Extra elements after each head row of q and out (a multiple of 8): exercises the activation strides,
    /// and the output's padding must keep its poison.
    pub act_pad: usize,
    /// Run the tensor-core prefill op instead of decode (any q_len up to 8192).
    pub prefill: bool,
    /// Elements (a multiple of 8) between the start of each cache's allocation and the cache: 8 puts it 16
    /// bytes past a 256-byte boundary, the least alignment the op accepts.
    pub cache_shift: usize,
}

impl DecodeCase {
    /// A decode case with the common defaults: causal, scale 1/√d, no window or softcap, a token-major
    /// cache holding exactly the longest length, lse requested, no activation padding.
    pub fn new(q_len: usize, num_q_heads: usize, num_kv_heads: usize, head_dim: usize, lens: &[i32]) -> Self {
        DecodeCase {
            q_len,
            num_q_heads,
            num_kv_heads,
            head_dim,
            lens: lens.to_vec(),
            max_seq_len: lens.iter().copied().max().unwrap_or(0) as usize,
            window: None,
            causal: true,
            scale: 1.0 / (head_dim as f32).sqrt(),
            softcap: None,
            layout: Layout::TokenMajor { pad: 0 },
            lse: true,
            act_pad: 0,
            prefill: false,
            cache_shift: 0,
        }
    }

    /// A one-line description for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "{} Tq={} heads {}/{} hd{} lens {:?} max {} window {:?} causal {} scale {} softcap {:?} {:?} pad {} shift {}",
            if self.prefill { "prefill" } else { "decode" },
            self.q_len,
            self.num_q_heads,
            self.num_kv_heads,
            self.head_dim,
            self.lens,
            self.max_seq_len,
            self.window,
            self.causal,
            self.scale,
            self.softcap,
            self.layout,
            self.act_pad,
            self.cache_shift
        )
    }

    pub fn batch(&self) -> usize {
        self.lens.len()
    }

    /// First key position any new query of a sequence of length `len` can see.
    fn first_visible(&self, len: usize) -> usize {
        self.window.map_or(0, |w| (len + 1).saturating_sub(self.q_len + w))
    }
}

/// A K or V cache laid out for a case: its memory image and how the op should address it.
pub struct PhysicalCache {
    pub data: Vec<bf16>,
    pub tensor: CacheTensor,
}

/// The logical cache [batch][max_seq_len][kv_heads][head_dim] placed in `layout`. Positions the op must
/// never read (past each length, and before the window of its first new query) hold NaN.
pub fn place_cache(case: &DecodeCase, logical: &[bf16], page_order: &[usize]) -> PhysicalCache {
    let (hkv, d, cap) = (case.num_kv_heads, case.head_dim, case.max_seq_len);
    let nan = bf16::from_bits(0xffff);
    let (stride_seq, stride_token, stride_head, slots) = match case.layout {
        Layout::TokenMajor { pad } => {
            let sh = d + pad;
            (cap * hkv * sh, hkv * sh, sh, case.batch())
        }
        Layout::HeadMajor => (hkv * cap * d, d, cap * d, case.batch()),
        Layout::Paged { page_size } => (page_size * hkv * d, hkv * d, d, page_order.len()),
    };
    let elems = slots * stride_seq;
    let mut data = vec![nan; elems];
    for (b, &len) in case.lens.iter().enumerate() {
        let len = len.max(0) as usize;
        for j in case.first_visible(len)..len {
            let base = match case.layout {
                Layout::Paged { page_size } => {
                    page_order[b * cap.div_ceil(page_size) + j / page_size] * stride_seq
                        + (j % page_size) * stride_token
                }
                _ => b * stride_seq + j * stride_token,
            };
            for h in 0..hkv {
                let src = ((b * cap + j) * hkv + h) * d;
                data[base + h * stride_head..base + h * stride_head + d].copy_from_slice(&logical[src..src + d]);
            }
        }
    }
    let tensor = CacheTensor {
        ptr: 0,
        stride_seq: stride_seq as i64,
        stride_token: stride_token as i64,
        stride_head: stride_head as i64,
        elems: elems as i64,
    };
    PhysicalCache { data, tensor }
}

/// Page assignment: every sequence gets `ceil(max_seq_len / page_size)` pages, in shuffled order, plus
/// two spare pages nobody uses.
pub fn page_order(case: &DecodeCase, rng: &mut Rng) -> Vec<usize> {
    let Layout::Paged { page_size } = case.layout else { return Vec::new() };
    let n = case.batch() * case.max_seq_len.div_ceil(page_size) + 2;
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    order
}

/// Naive attention of one query row in f64 from the definition: an explicit score vector, its softmax,
/// the weighted sum. Returns the output row and the log-sum-exp (−∞ and zeros with no visible key).
pub fn naive_attention_row(
    q: &[f64],
    keys: &[(Vec<f64>, Vec<f64>)],
    scale: f64,
    softcap: Option<f64>,
) -> (Vec<f64>, f64) {
    let d = q.len();
    if keys.is_empty() {
        return (vec![0.0; d], f64::NEG_INFINITY);
    }
    let scores: Vec<f64> = keys
        .iter()
        .map(|(k, _)| {
            let s = scale * q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>();
            softcap.map_or(s, |c| c * (s / c).tanh())
        })
        .collect();
    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut out = vec![0.0; d];
    for (w, (_, v)) in weights.iter().zip(keys) {
        for (o, x) in out.iter_mut().zip(v) {
            *o += w / total * x;
        }
    }
    (out, max + total.ln())
}

/// The expected output and lse of a case: `reference::attention` on a CUDA context, the naive formula on
/// the CPU backend.
pub fn expected(ctx: &Context, case: &DecodeCase, q: &[bf16], k: &[bf16], v: &[bf16]) -> (Vec<f32>, Vec<f32>) {
    let (hkv, d, cap) = (case.num_kv_heads, case.head_dim, case.max_seq_len);
    let lens: Vec<usize> = case.lens.iter().map(|&l| (l.max(0) as usize).min(cap)).collect();
    let rows = case.batch() * case.q_len * case.num_q_heads;
    match ctx.backend() {
        Backend::Cuda(_) => {
            let seq = |c: &[bf16]| -> Vec<Vec<bf16>> {
                lens.iter()
                    .enumerate()
                    .map(|(b, &len)| c[b * cap * hkv * d..(b * cap + len) * hkv * d].to_vec())
                    .collect()
            };
            let problem = refattn::DecodeProblem {
                batch: case.batch(),
                q_len: case.q_len,
                num_q_heads: case.num_q_heads,
                num_kv_heads: hkv,
                head_dim: d,
                window: case.window,
                causal: case.causal,
                scale: case.scale,
                softcap: case.softcap,
            };
            let mut out = vec![bf16::ZERO; rows * d];
            let mut lse = vec![0f32; rows];
            refattn::decode(&problem, q, &seq(k), &seq(v), &mut out, &mut lse);
            (f32s(&out), lse)
        }
        Backend::Cpu => {
            let group = case.num_q_heads / hkv;
            let mut out = Vec::with_capacity(rows * d);
            let mut lse = Vec::with_capacity(rows);
            for (b, &len) in lens.iter().enumerate() {
                for t in 0..case.q_len {
                    let pos = len as i64 - case.q_len as i64 + t as i64;
                    for h in 0..case.num_q_heads {
                        let row = (b * case.q_len + t) * case.num_q_heads + h;
                        let qr: Vec<f64> = q[row * d..(row + 1) * d].iter().map(|x| x.to_f64()).collect();
                        let keys: Vec<(Vec<f64>, Vec<f64>)> = (0..len as i64)
                            .filter(|&j| (!case.causal || j <= pos) && case.window.is_none_or(|w| j > pos - w as i64))
                            .map(|j| {
                                let o = ((b * cap + j as usize) * hkv + h / group) * d;
                                (
                                    k[o..o + d].iter().map(|x| x.to_f64()).collect(),
                                    v[o..o + d].iter().map(|x| x.to_f64()).collect(),
                                )
                            })
                            .collect();
                        let (o, l) = naive_attention_row(&qr, &keys, case.scale as f64, case.softcap.map(|c| c as f64));
                        out.extend(o.iter().map(|&x| x as f32));
                        lse.push(l as f32);
                    }
                }
            }
            (out, lse)
        }
    }
}

/// Compares lse values: both −∞ counts as equal (an empty row), one-sided −∞ as non-finite.
pub fn compare_lse(got: &[f32], want: &[f32]) -> Comparison {
    let mut g = Vec::with_capacity(got.len());
    let mut w = Vec::with_capacity(want.len());
    for (&a, &b) in got.iter().zip(want) {
        if a == f32::NEG_INFINITY && b == f32::NEG_INFINITY {
            g.push(0.0);
            w.push(0.0);
        } else {
            g.push(a);
            w.push(b);
        }
    }
    Comparison::new(&g, &w)
}

/// Random inputs of a case: q and the logical K, V caches, scaled so that the logits spread over a few
/// units whatever the attention scale (as q/k norms make them in the real models).
pub fn random_inputs(case: &DecodeCase, rng: &mut Rng) -> (Vec<bf16>, Vec<bf16>, Vec<bf16>) {
    let d = case.head_dim;
    let rows = case.batch() * case.q_len * case.num_q_heads;
    let q_scale = 2.0 / (case.scale.abs().max(1e-6) * (d as f32).sqrt());
    let q = rng.bf16_normal(rows * d, q_scale);
    let cache = case.batch() * case.max_seq_len * case.num_kv_heads * d;
    (q, rng.bf16_normal(cache, 1.0), rng.bf16_normal(cache, 1.0))
}

/// Runs one case: the op's `out` against the oracle, and its `lse` in the `residual` slot of the result
/// (the second output of the op).
pub fn check_decode(ctx: &Context, stream: Stream, case: &DecodeCase, seed: u64) -> Result<CheckResult> {
    let mut rng = Rng::new(seed);
    let (q, k, v) = random_inputs(case, &mut rng);
    let order = page_order(case, &mut rng);
    let (kc, vc) = (place_cache(case, &k, &order), place_cache(case, &v, &order));
    let run = run_decode(ctx, stream, case, &q, &kc, &vc, &order)?;
    let (want_out, want_lse) = expected(ctx, case, &q, &k, &v);
    Ok(CheckResult {
        out: Comparison::new(&run.out, &want_out),
        residual: case.lse.then(|| compare_lse(&run.lse, &want_lse)),
        stray_writes: run.stray_writes,
    })
}

/// What one run of the op produced.
pub struct DecodeRun {
    /// Dense [batch, q_len, num_q_heads, head_dim].
    pub out: Vec<f32>,
    /// Empty when the case has no lse.
    pub lse: Vec<f32>,
    /// Elements of the output's head-row padding that lost their poison.
    pub stray_writes: usize,
}

/// Runs the op once on placed caches (q given dense; laid out with the case's padding here).
pub fn run_decode(
    ctx: &Context,
    stream: Stream,
    case: &DecodeCase,
    q: &[bf16],
    kc: &PhysicalCache,
    vc: &PhysicalCache,
    order: &[usize],
) -> Result<DecodeRun> {
    let rows = case.batch() * case.q_len * case.num_q_heads;
    let (d, pitch) = (case.head_dim, case.head_dim + case.act_pad);
    let mut q_padded = vec![bf16::ZERO; rows * pitch];
    for r in 0..rows {
        q_padded[r * pitch..r * pitch + d].copy_from_slice(&q[r * d..(r + 1) * d]);
    }
    let q_buf = TestBuffer::from_slice(ctx, &q_padded)?;
    let k_buf = cache_buffer(ctx, case, &kc.data)?;
    let v_buf = cache_buffer(ctx, case, &vc.data)?;
    let lens_buf = TestBuffer::from_slice(ctx, &case.lens)?;
    let table: Vec<i32> = order.iter().map(|&p| p as i32).collect();
    let table_buf = TestBuffer::from_slice(ctx, if table.is_empty() { &[0i32][..] } else { &table })?;
    let out_buf = TestBuffer::new(ctx, rows * pitch * 2)?;
    let lse_buf = TestBuffer::new(ctx, rows * 4)?;
    out_buf.poison()?;
    lse_buf.poison()?;
    let mut args = decode_args(case, &q_buf, &k_buf, &v_buf, kc, vc, &lens_buf, &table_buf, &out_buf, &lse_buf);
    args.k.ptr += case.cache_shift as u64 * 2;
    args.v.ptr += case.cache_shift as u64 * 2;
    let ws_bytes = if case.prefill { 0 } else { attention::decode_workspace_size(ctx, &args)? };
    let ws_buf = TestBuffer::new(ctx, ws_bytes.max(16))?;
    ws_buf.poison()?;
    args.workspace = ws_buf.ptr();
    args.workspace_bytes = ws_bytes as u64;
    // Every address is a buffer allocated above with the extent the arguments describe.
    unsafe {
        if case.prefill {
            attention::prefill(ctx, &args, stream)?
        } else {
            attention::decode(ctx, &args, stream)?
        }
    };
    stream.synchronize(ctx)?;
    let raw: Vec<u16> = out_buf.download(rows * pitch)?;
    let stray_writes = padding_writes(&raw, rows, d, pitch);
    let out: Vec<bf16> = dense_rows(&raw.iter().map(|&b| bf16::from_bits(b)).collect::<Vec<_>>(), rows, d, pitch);
    let lse: Vec<f32> = if case.lse { lse_buf.download(rows)? } else { Vec::new() };
    Ok(DecodeRun { out: f32s(&out), lse, stray_writes })
}

/// A placed cache in memory of the context, `case.cache_shift` elements into its buffer (see
/// [`run_decode`], which points the op there).
fn cache_buffer<'a>(ctx: &'a Context, case: &DecodeCase, data: &[bf16]) -> Result<TestBuffer<'a>> {
    if case.cache_shift == 0 {
        return TestBuffer::from_slice(ctx, data);
    }
    TestBuffer::from_slice(ctx, &[&vec![bf16::ZERO; case.cache_shift][..], data].concat())
}

/// The op's arguments for a case over the given buffers (no workspace yet).
pub fn decode_args(
    case: &DecodeCase,
    q: &TestBuffer,
    k: &TestBuffer,
    v: &TestBuffer,
    kc: &PhysicalCache,
    vc: &PhysicalCache,
    lens: &TestBuffer,
    table: &TestBuffer,
    out: &TestBuffer,
    lse: &TestBuffer,
) -> DecodeArgs {
    let layout = match case.layout {
        Layout::Paged { page_size } => CacheLayout::Paged {
            page_table: table.ptr(),
            page_table_stride: 0,
            page_size: page_size as i64,
            num_pages: kc.tensor.elems / kc.tensor.stride_seq,
        },
        _ => CacheLayout::Contiguous,
    };
    let pitch = (case.head_dim + case.act_pad) as i64;
    let strides = [case.q_len as i64 * case.num_q_heads as i64 * pitch, case.num_q_heads as i64 * pitch, pitch];
    DecodeArgs {
        q: q.ptr(),
        q_strides: strides,
        k: CacheTensor { ptr: k.ptr(), ..kc.tensor },
        v: CacheTensor { ptr: v.ptr(), ..vc.tensor },
        layout,
        seq_lens: lens.ptr(),
        out: out.ptr(),
        out_strides: strides,
        lse: if case.lse { lse.ptr() } else { 0 },
        workspace: 0,
        workspace_bytes: 0,
        batch: case.batch() as i64,
        q_len: case.q_len as i64,
        num_q_heads: case.num_q_heads as i64,
        num_kv_heads: case.num_kv_heads as i64,
        head_dim: case.head_dim as i64,
        max_seq_len: case.max_seq_len as i64,
        window: case.window.map(|w| w as i64),
        causal: case.causal,
        scale: case.scale,
        softcap: case.softcap,
    }
}

/// An attention layer shape: (label, q heads, kv heads, head dim, window, scale).
pub type ModelShape = (&'static str, usize, usize, usize, Option<usize>, f32);

/// The attention layers of MODELS.md and the generic shape of the issue.
pub const MODEL_SHAPES: &[ModelShape] = &[
    ("qwen3.5 full attention", 16, 2, 256, None, 0.0625),
    ("gemma4 local (window 1024)", 16, 8, 256, Some(1024), 1.0),
    ("gemma4 global", 16, 2, 512, None, 1.0),
    ("generic 32/8 hd128", 32, 8, 128, None, 0.088_388_35),
];

pub fn model_checks(cpu: bool) -> Vec<ModelCheck> {
    let mut checks = Vec::new();
    // The CPU backend is the reference itself, slow at long context: keep its lengths short.
    let (lens, max): (Vec<i32>, usize) = if cpu { (vec![37], 64) } else { (vec![4097], 4097) };
    let batch_lens: Vec<i32> = if cpu { vec![1, 19, 64] } else { vec![1, 1023, 1024, 1025, 4097] };
    for &(label, hq, hkv, d, window, scale) in MODEL_SHAPES {
        for (q_len, layout, batch) in [
            (1, Layout::TokenMajor { pad: 0 }, false),
            (1, Layout::Paged { page_size: 16 }, true),
            (4, Layout::HeadMajor, false),
        ] {
            let case = DecodeCase {
                q_len,
                num_q_heads: hq,
                num_kv_heads: hkv,
                head_dim: d,
                lens: if batch { batch_lens.clone() } else { lens.clone() },
                max_seq_len: max,
                window,
                causal: true,
                scale,
                softcap: None,
                layout,
                lse: true,
                act_pad: if batch { 8 } else { 0 },
                prefill: false,
                cache_shift: 0,
            };
            let variant = format!("Tq={q_len} B={} {layout:?}", case.batch());
            checks.push(ModelCheck {
                op: "attention",
                shape: format!("{label} ctx {max}"),
                variant,
                tol: BF16_TOL,
                run: Box::new(move |ctx, stream, seed| check_decode(ctx, stream, &case, seed)),
            });
        }
    }
    checks
}
