//! Decode attention on the CPU: the reference against the naive f64 formula, the CPU backend through the
//! C API in every cache layout, and every bad argument the C API must name.

use sparkinfer::capi::sparkinfer_status::*;
use sparkinfer::capi::*;
use sparkinfer::checks::attention::{
    check_decode, naive_attention_row, page_order, place_cache, random_inputs, DecodeCase, Layout,
};
use sparkinfer::ops::{Context, Stream, DEVICE_CPU};
use sparkinfer::reference::{attention as refattn, bf16};
use sparkinfer::testing::{Rng, BF16_TOL};
use std::ffi::{c_void, CStr};
use std::ptr::{null, null_mut};

fn case(q_len: usize, hq: usize, hkv: usize, d: usize, lens: &[i32], max: usize) -> DecodeCase {
    DecodeCase { max_seq_len: max, ..DecodeCase::new(q_len, hq, hkv, d, lens) }
}

/// Every output element of the reference within one bf16 rounding of the naive f64 value, and lse close.
#[test]
fn reference_matches_the_naive_softmax() {
    let mut rng = Rng::new(3);
    let mut cases =
        vec![case(1, 16, 2, 256, &[1, 7, 33], 40), case(3, 8, 8, 64, &[5, 2, 0], 9), case(8, 4, 1, 128, &[20], 20)];
    let mut windowed = case(2, 16, 8, 256, &[30, 3], 30);
    windowed.window = Some(8);
    cases.push(windowed);
    let mut capped = case(4, 2, 1, 512, &[12], 12);
    capped.softcap = Some(5.0);
    capped.causal = false;
    cases.push(capped);
    for c in &cases {
        let (q, k, v) = random_inputs(c, &mut rng);
        let (hkv, d, cap) = (c.num_kv_heads, c.head_dim, c.max_seq_len);
        let seq = |x: &[bf16]| -> Vec<Vec<bf16>> {
            c.lens
                .iter()
                .enumerate()
                .map(|(b, &l)| x[b * cap * hkv * d..(b * cap + l as usize) * hkv * d].to_vec())
                .collect()
        };
        let problem = refattn::DecodeProblem {
            batch: c.batch(),
            q_len: c.q_len,
            num_q_heads: c.num_q_heads,
            num_kv_heads: hkv,
            head_dim: d,
            window: c.window,
            causal: c.causal,
            scale: c.scale,
            softcap: c.softcap,
        };
        let rows = c.batch() * c.q_len * c.num_q_heads;
        let mut out = vec![bf16::ZERO; rows * d];
        let mut lse = vec![0f32; rows];
        refattn::decode(&problem, &q, &seq(&k), &seq(&v), &mut out, &mut lse);
        let group = c.num_q_heads / hkv;
        for (b, &len) in c.lens.iter().enumerate() {
            for t in 0..c.q_len {
                let pos = len as i64 - c.q_len as i64 + t as i64;
                for h in 0..c.num_q_heads {
                    let row = (b * c.q_len + t) * c.num_q_heads + h;
                    let qr: Vec<f64> = q[row * d..(row + 1) * d].iter().map(|x| x.to_f64()).collect();
                    let keys: Vec<(Vec<f64>, Vec<f64>)> = (0..len as i64)
                        .filter(|&j| (!c.causal || j <= pos) && c.window.is_none_or(|w| j > pos - w as i64))
                        .map(|j| {
                            let o = ((b * cap + j as usize) * hkv + h / group) * d;
                            (
                                k[o..o + d].iter().map(|x| x.to_f64()).collect(),
                                v[o..o + d].iter().map(|x| x.to_f64()).collect(),
                            )
                        })
                        .collect();
                    let (want, want_lse) = naive_attention_row(&qr, &keys, c.scale as f64, c.softcap.map(|x| x as f64));
                    let scale = want.iter().map(|x| x.abs()).fold(1e-3, f64::max);
                    for i in 0..d {
                        let got = out[row * d + i].to_f64();
                        assert!(
                            (got - want[i]).abs() <= scale / 128.0,
                            "{}: row {row} dim {i}: {got} vs {}",
                            c.describe(),
                            want[i]
                        );
                    }
                    if want_lse.is_infinite() {
                        assert_eq!(lse[row], f32::NEG_INFINITY, "{}: row {row}", c.describe());
                        assert!(out[row * d..(row + 1) * d].iter().all(|x| x.to_f32() == 0.0));
                    } else {
                        assert!(
                            (lse[row] as f64 - want_lse).abs() <= 1e-4 * want_lse.abs().max(1.0),
                            "{}: lse row {row}",
                            c.describe()
                        );
                    }
                }
            }
        }
    }
}

/// The CPU backend through `ops` in every layout, against the naive formula (lengths 0, 1, full).
#[test]
fn cpu_backend_matches_the_definition_in_every_layout() {
    let ctx = Context::new(DEVICE_CPU).unwrap();
    let layouts = [
        Layout::TokenMajor { pad: 0 },
        Layout::TokenMajor { pad: 8 },
        Layout::HeadMajor,
        Layout::Paged { page_size: 16 },
        Layout::Paged { page_size: 256 },
    ];
    let mut seed = 100;
    for layout in layouts {
        for (q_len, hq, hkv, d, window, softcap) in [
            (1, 16, 2, 256, None, None),
            (3, 16, 8, 256, Some(5), None),
            (2, 16, 2, 512, None, Some(30.0)),
            (8, 32, 8, 128, None, None),
            (1, 16, 1, 64, Some(40), None),
        ] {
            let mut c = case(q_len, hq, hkv, d, &[0, 1, 2, 37, 40], 40);
            c.layout = layout;
            c.window = window;
            c.softcap = softcap;
            c.act_pad = if d == 64 { 8 } else { 0 };
            seed += 1;
            let r = check_decode(&ctx, Stream::NULL, &c, seed).unwrap();
            assert!(r.passes(BF16_TOL), "{} seed {seed}: {r:?}", c.describe());
        }
    }
}

fn last_error() -> String {
    unsafe { CStr::from_ptr(sparkinfer_last_error()) }.to_string_lossy().into_owned()
}

/// Host memory for the C API tests: the placed caches, q, out and the rest, kept alive together.
struct Problem {
    ctx: *mut sparkinfer_context,
    q: Vec<bf16>,
    k: Vec<bf16>,
    v: Vec<bf16>,
    lens: Vec<i32>,
    table: Vec<i32>,
    out: Vec<bf16>,
    lse: Vec<f32>,
    case: DecodeCase,
    k_strides: [i64; 4],
    v_strides: [i64; 4],
}

impl Problem {
    fn new(c: DecodeCase, seed: u64) -> Self {
        let mut ctx = null_mut();
        assert_eq!(sparkinfer_context_create(SPARKINFER_DEVICE_CPU, &mut ctx), SPARKINFER_STATUS_SUCCESS);
        let mut rng = Rng::new(seed);
        let (q, k, v) = random_inputs(&c, &mut rng);
        let order = page_order(&c, &mut rng);
        let (kc, vc) = (place_cache(&c, &k, &order), place_cache(&c, &v, &order));
        let rows = c.batch() * c.q_len * c.num_q_heads;
        let strides =
            |t: &sparkinfer::ops::attention::CacheTensor| [t.stride_seq, t.stride_token, t.stride_head, t.elems];
        Problem {
            ctx,
            q,
            k_strides: strides(&kc.tensor),
            v_strides: strides(&vc.tensor),
            k: kc.data,
            v: vc.data,
            lens: c.lens.clone(),
            table: order.iter().map(|&p| p as i32).collect(),
            out: vec![bf16::from_bits(0xffff); rows * c.head_dim],
            lse: vec![f32::NAN; rows],
            case: c,
        }
    }

    fn params(&mut self) -> sparkinfer_attention_decode_params {
        let c = &self.case;
        let paged = matches!(c.layout, Layout::Paged { .. });
        let cache = |data: &Vec<bf16>, s: [i64; 4]| sparkinfer_kv_cache {
            data: data.as_ptr() as *const c_void,
            stride_seq: s[0],
            stride_token: s[1],
            stride_head: s[2],
            elems: s[3],
        };
        sparkinfer_attention_decode_params {
            q: self.q.as_ptr() as *const c_void,
            q_stride_batch: 0,
            q_stride_token: 0,
            q_stride_head: 0,
            k_cache: cache(&self.k, self.k_strides),
            v_cache: cache(&self.v, self.v_strides),
            cache_layout: if paged { SPARKINFER_KV_CACHE_PAGED } else { SPARKINFER_KV_CACHE_CONTIGUOUS },
            page_table: if paged { self.table.as_ptr() } else { null() },
            page_table_stride: 0,
            page_size: if let Layout::Paged { page_size } = c.layout { page_size as i64 } else { 0 },
            num_pages: if paged { self.k_strides[3] / self.k_strides[0] } else { 0 },
            seq_lens: self.lens.as_ptr(),
            out: self.out.as_mut_ptr() as *mut c_void,
            out_stride_batch: 0,
            out_stride_token: 0,
            out_stride_head: 0,
            lse: self.lse.as_mut_ptr(),
            workspace: null_mut(),
            workspace_bytes: 0,
            batch: c.batch() as i64,
            q_len: c.q_len as i64,
            num_q_heads: c.num_q_heads as i64,
            num_kv_heads: c.num_kv_heads as i64,
            head_dim: c.head_dim as i64,
            max_seq_len: c.max_seq_len as i64,
            window: c.window.map_or(SPARKINFER_ATTENTION_NO_WINDOW, |w| w as i64),
            causal: c.causal as i32,
            scale: c.scale,
            softcap: c.softcap.unwrap_or(0.0),
        }
    }

    fn run(&mut self, p: &sparkinfer_attention_decode_params) -> sparkinfer_status {
        sparkinfer_attention_decode(self.ctx, p, null_mut())
    }
}

impl Drop for Problem {
    fn drop(&mut self) {
        sparkinfer_context_destroy(self.ctx);
    }
}

fn qwen_case(layout: Layout) -> DecodeCase {
    let mut c = case(2, 16, 2, 256, &[0, 5, 48], 48);
    c.scale = 0.0625;
    c.layout = layout;
    c
}

/// Contiguous (both layouts) and paged caches holding the same data give the same output, bit for bit.
#[test]
fn paged_and_contiguous_caches_agree_through_the_c_api() {
    let mut outputs = Vec::new();
    for layout in [
        Layout::TokenMajor { pad: 0 },
        Layout::HeadMajor,
        Layout::Paged { page_size: 16 },
        Layout::Paged { page_size: 32 },
    ] {
        let mut pr = Problem::new(qwen_case(layout), 7);
        let p = pr.params();
        let mut ws = usize::MAX;
        assert_eq!(sparkinfer_attention_decode_workspace_size(pr.ctx, &p, &mut ws), SPARKINFER_STATUS_SUCCESS);
        assert_eq!(ws, 0, "the CPU backend needs no workspace");
        assert_eq!(pr.run(&p), SPARKINFER_STATUS_SUCCESS, "{layout:?}: {}", last_error());
        // Length 0: zeros and lse = -inf, never NaN.
        let rows0 = pr.case.q_len * pr.case.num_q_heads;
        assert!(pr.out[..rows0 * 256].iter().all(|x| x.to_f32() == 0.0), "{layout:?}: length 0 output");
        assert!(pr.lse[..rows0].iter().all(|&x| x == f32::NEG_INFINITY), "{layout:?}: length 0 lse");
        assert!(pr.out.iter().all(|x| x.to_f32().is_finite()), "{layout:?}: non-finite output");
        outputs.push((layout, pr.out.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), pr.lse.clone()));
    }
    for (layout, out, lse) in &outputs[1..] {
        assert!(out == &outputs[0].1, "{layout:?} differs from {:?}", outputs[0].0);
        assert!(lse.iter().zip(&outputs[0].2).all(|(a, b)| a == b || (a.is_nan() && b.is_nan())), "{layout:?} lse");
    }
}

/// Each bad argument fails with the right status and a message naming it.
#[test]
fn bad_arguments_are_named() {
    let mut pr = Problem::new(qwen_case(Layout::Paged { page_size: 16 }), 9);
    let good = pr.params();
    type Edit = fn(&mut sparkinfer_attention_decode_params);
    let cases: Vec<(&str, Edit, sparkinfer_status)> = vec![
        ("head_dim", |p| p.head_dim = 96, SPARKINFER_STATUS_UNSUPPORTED),
        ("head_dim", |p| p.head_dim = 0, SPARKINFER_STATUS_UNSUPPORTED),
        ("num_q_heads", |p| p.num_q_heads = 17, SPARKINFER_STATUS_INVALID_ARGUMENT),
        ("num_q_heads", |p| p.num_q_heads = 64, SPARKINFER_STATUS_UNSUPPORTED),
        ("num_kv_heads", |p| p.num_kv_heads = 0, SPARKINFER_STATUS_INVALID_ARGUMENT),
        ("q_len", |p| p.q_len = 9, SPARKINFER_STATUS_INVALID_ARGUMENT),
        ("q_len", |p| p.q_len = 0, SPARKINFER_STATUS_INVALID_ARGUMENT),
        ("batch", |p| p.batch = 0, SPARKINFER_STATUS_INVALID_ARGUMENT),
        ("max_seq_len", |p| p.max_seq_len = 0, SPARKINFER_STATUS_INVALID_ARGUMENT),
        ("window", |p| p.window = 0, SPARKINFER_STATUS_INVALID_ARGUMENT),
        ("window", |p| p.window = -2, SPARKINFER_STATUS_INVALID_ARGUMENT),
        ("causal", |p| p.causal = 2, SPARKINFER_STATUS_INVALID_ARGUMENT),
        ("scale", |p| p.scale = f32::NAN, SPARKINFER_STATUS_INVALID_ARGUMENT),
        ("softcap", |p| p.softcap = -1.0, SPARKINFER_STATUS_INVALID_ARGUMENT),
        ("cache_layout", |p| p.cache_layout = 7, SPARKINFER_STATUS_INVALID_ARGUMENT),
        ("page_size", |p| p.page_size = 48, SPARKINFER_STATUS_INVALID_ARGUMENT),
        ("page_size", |p| p.page_size = 8, SPARKINFER_STATUS_INVALID_ARGUMENT),
        ("page_size", |p| p.page_size = 512, SPARKINFER_STATUS_INVALID_ARGUMENT),
        ("page_table", |p| p.page_table = null(), SPARKINFER_STATUS_INVALID_ARGUMENT),
        ("page_table_stride", |p| p.page_table_stride = 2, SPARKINFER_STATUS_INVALID_ARGUMENT),
        ("num_pages", |p| p.num_pages = 0, SPARKINFER_STATUS_INVALID_ARGUMENT),
        ("k_cache", |p| p.num_pages += 1, SPARKINFER_STATUS_INVALID_ARGUMENT),
        ("k_cache", |p| p.k_cache.elems -= 1, SPARKINFER_STATUS_INVALID_ARGUMENT),
        ("v_cache", |p| p.v_cache.stride_token += 8, SPARKINFER_STATUS_INVALID_ARGUMENT),
        ("k_cache", |p| p.k_cache.stride_head = 4, SPARKINFER_STATUS_INVALID_ARGUMENT),
        ("k_cache", |p| p.k_cache.stride_seq = 0, SPARKINFER_STATUS_INVALID_ARGUMENT),
        // Tensor maps stride less than 2^40 bytes.
        ("k_cache", |p| p.k_cache.stride_seq = 1 << 39, SPARKINFER_STATUS_UNSUPPORTED),
        ("v_cache", |p| p.v_cache.stride_token = 1 << 39, SPARKINFER_STATUS_UNSUPPORTED),
        ("k_cache", |p| p.k_cache.data = null(), SPARKINFER_STATUS_INVALID_ARGUMENT),
        (
            "v_cache",
            |p| p.v_cache.data = (p.v_cache.data as usize + 2) as *const c_void,
            SPARKINFER_STATUS_INVALID_ARGUMENT,
        ),
        ("q", |p| p.q = (p.q as usize + 8) as *const c_void, SPARKINFER_STATUS_INVALID_ARGUMENT),
        ("q", |p| p.q_stride_head = 100, SPARKINFER_STATUS_INVALID_ARGUMENT),
        ("q", |p| p.q_stride_head = 128, SPARKINFER_STATUS_INVALID_ARGUMENT),
        ("out", |p| p.out = null_mut(), SPARKINFER_STATUS_INVALID_ARGUMENT),
        ("out", |p| p.out_stride_token = -8, SPARKINFER_STATUS_INVALID_ARGUMENT),
        ("out", |p| p.out = p.q as *mut c_void, SPARKINFER_STATUS_INVALID_ARGUMENT),
        ("seq_lens", |p| p.seq_lens = null(), SPARKINFER_STATUS_INVALID_ARGUMENT),
        ("lse", |p| p.lse = (p.lse as usize + 2) as *mut f32, SPARKINFER_STATUS_INVALID_ARGUMENT),
    ];
    for (name, edit, want) in cases {
        let mut p = good;
        edit(&mut p);
        let status = pr.run(&p);
        let msg = last_error();
        assert_eq!(status, want, "{name}: {msg}");
        assert!(msg.starts_with(name), "expected the message to name {name:?}, got {msg:?}");
    }
    let mut bad = good;
    bad.head_dim = 96;
    let mut bytes = 0usize;
    assert_eq!(sparkinfer_attention_decode_workspace_size(pr.ctx, &bad, &mut bytes), SPARKINFER_STATUS_UNSUPPORTED);
    assert!(last_error().starts_with("head_dim"));
    assert_eq!(sparkinfer_attention_decode(pr.ctx, null(), null_mut()), SPARKINFER_STATUS_INVALID_ARGUMENT);
    assert!(last_error().starts_with("params"));
    assert_eq!(sparkinfer_attention_decode(null(), &good, null_mut()), SPARKINFER_STATUS_INVALID_ARGUMENT);
    assert!(last_error().starts_with("ctx"));
    assert_eq!(
        sparkinfer_attention_decode_workspace_size(pr.ctx, &good, null_mut()),
        SPARKINFER_STATUS_INVALID_ARGUMENT
    );
    assert!(last_error().starts_with("bytes"));
    // The CPU backend refuses a stream.
    let fake_stream = 0x1000 as sparkinfer_stream;
    assert_eq!(sparkinfer_attention_decode(pr.ctx, &good, fake_stream), SPARKINFER_STATUS_INVALID_ARGUMENT);
    assert!(last_error().starts_with("stream"));
    assert_eq!(pr.run(&good), SPARKINFER_STATUS_SUCCESS, "{}", last_error());
}

/// Prefill on the CPU backend (the reference) against the naive formula, and its argument checks.
#[test]
fn prefill_matches_the_definition_and_names_bad_arguments() {
    let ctx = Context::new(DEVICE_CPU).unwrap();
    for (q_len, hq, hkv, d, window, layout) in [
        (20, 4, 2, 64, None, Layout::TokenMajor { pad: 0 }),
        (33, 16, 2, 256, Some(7), Layout::Paged { page_size: 16 }),
        (9, 8, 8, 128, None, Layout::HeadMajor),
    ] {
        let mut c = case(q_len, hq, hkv, d, &[q_len as i32, q_len as i32 + 11], q_len + 11);
        c.window = window;
        c.layout = layout;
        c.prefill = true;
        let r = check_decode(&ctx, Stream::NULL, &c, 5).unwrap();
        assert!(r.passes(BF16_TOL), "{}: {r:?}", c.describe());
    }
    let mut c = qwen_case(Layout::TokenMajor { pad: 0 });
    c.q_len = 40;
    c.lens = vec![40, 40, 48];
    let mut pr = Problem::new(c, 13);
    let good = pr.params();
    assert_eq!(sparkinfer_attention_prefill(pr.ctx, &good, null_mut()), SPARKINFER_STATUS_SUCCESS, "{}", last_error());
    // Every decode head_dim has a prefill kernel; others are refused as by decode.
    let mut p = good;
    p.head_dim = 96;
    assert_eq!(sparkinfer_attention_prefill(pr.ctx, &p, null_mut()), SPARKINFER_STATUS_UNSUPPORTED);
    assert!(last_error().starts_with("head_dim"), "{}", last_error());
    let mut p = good;
    p.q_len = 8193;
    assert_eq!(sparkinfer_attention_prefill(pr.ctx, &p, null_mut()), SPARKINFER_STATUS_INVALID_ARGUMENT);
    assert!(last_error().starts_with("q_len"), "{}", last_error());
    // Decode keeps its limit of 8 new tokens.
    assert_eq!(sparkinfer_attention_decode(pr.ctx, &good, null_mut()), SPARKINFER_STATUS_INVALID_ARGUMENT);
    assert!(last_error().starts_with("q_len"), "{}", last_error());
}
