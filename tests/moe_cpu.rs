//! The MoE reference against the independent f64 formulas, the MoE ops on the CPU backend (checks,
//! NaN inputs), every bad-input path of the MoE C functions, and examples_c/moe_block.c built and run
//! against the freshly built library.

use sparkinfer::capi::sparkinfer_status::*;
use sparkinfer::capi::*;
use sparkinfer::checks::moe::{
    self as mc, check_block, check_dense, check_topk, naive, BlockCase, LogitPattern, RoutingPattern, TopkCase, GEMMA4,
    QWEN35,
};
use sparkinfer::reference::bf16;
use sparkinfer::reference::moe::{self as refmoe, Activation, FfnWeights, RouterTransform, Scoring, TopkConfig};
use sparkinfer::testing::{Rng, BF16_TOL};
use sparkinfer::{ops::Stream, Context};
use std::ffi::{c_void, CStr};
use std::ptr::{null, null_mut};

fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs() / scale))
}

#[test]
fn router_logits_match_the_naive_formula_with_and_without_transform() {
    let mut rng = Rng::new(1);
    let (t, h, e) = (3, 64, 16);
    let x = rng.bf16_normal(t * h, 1.0);
    let w = rng.bf16_normal(e * h, 0.2);
    let scale: Vec<bf16> = (0..h).map(|_| bf16::from_f32(rng.range(0.5, 1.5))).collect();
    for transform in [false, true] {
        let tr = transform.then(|| RouterTransform { scale: &scale, eps: 1e-6 });
        let got = refmoe::router_logits(&x, t, h, &w, e, tr);
        for r in 0..t {
            let want = naive::router_row(&x[r * h..(r + 1) * h], &w, e, transform.then(|| (&scale[..], 1e-6)));
            let got_row: Vec<f64> = got[r * e..(r + 1) * e].iter().map(|&v| v as f64).collect();
            assert!(max_rel(&got_row, &want) < 1e-6, "transform {transform} token {r}");
        }
    }
}

#[test]
fn topk_router_matches_the_naive_selection_and_scores() {
    let mut rng = Rng::new(2);
    let (t, e) = (20, 64);
    let mut logits: Vec<f32> = (0..t * e).map(|_| rng.normal()).collect();
    // Ties, NaN and infinities in some rows.
    for v in &mut logits[e..2 * e] {
        *v = 0.5;
    }
    logits[2 * e + 3] = f32::NAN;
    logits[3 * e + 7] = f32::INFINITY;
    logits[4 * e + 1] = f32::NEG_INFINITY;
    let scale: Vec<f32> = (0..e).map(|_| rng.range(0.5, 1.5)).collect();
    for (k, scoring, renormalize, with_scale) in [
        (8, Scoring::Softmax, true, false),
        (8, Scoring::Softmax, true, true),
        (4, Scoring::Sigmoid, false, false),
        (16, Scoring::Sigmoid, true, true),
        (64, Scoring::Softmax, false, false),
    ] {
        let cfg = TopkConfig { top_k: k, scoring, renormalize, expert_scale: with_scale.then_some(&scale[..]) };
        let r = refmoe::topk_router(&logits, t, e, &cfg);
        for tok in 0..t {
            let (ids, weights) = naive::topk_row(
                &logits[tok * e..(tok + 1) * e],
                k,
                scoring == Scoring::Sigmoid,
                renormalize,
                cfg.expert_scale,
            );
            let got_ids: Vec<usize> = r.ids[tok * k..(tok + 1) * k].iter().map(|&v| v as usize).collect();
            assert_eq!(got_ids, ids, "token {tok} k {k} {scoring:?}");
            for (j, &w) in weights.iter().enumerate() {
                let g = r.weights[tok * k + j] as f64;
                assert!(
                    (g.is_nan() && w.is_nan()) || (g - w).abs() <= 1e-6 * w.abs().max(1e-3),
                    "token {tok} slot {j}: {g} vs {w}"
                );
            }
        }
        let (counts, offsets, sorted) = naive::index(&r.ids, e);
        assert_eq!((r.counts.clone(), r.offsets.clone(), r.sorted_slots.clone()), (counts, offsets, sorted));
    }
    // Tied row: experts 0..k−1 in order.
    let cfg = TopkConfig { top_k: 8, scoring: Scoring::Softmax, renormalize: true, expert_scale: None };
    let r = refmoe::topk_router(&logits, t, e, &cfg);
    assert_eq!(&r.ids[8..16], &[0, 1, 2, 3, 4, 5, 6, 7]);
    // NaN ranks last, so expert 3 is not chosen in row 2 unless every other expert is.
    assert!(!r.ids[16..24].contains(&3));
}

#[test]
fn expert_and_dense_ffn_match_the_naive_formula() {
    let mut rng = Rng::new(3);
    let (t, h, e, i, k) = (3, 64, 6, 24, 2);
    let x = rng.bf16_normal(t * h, 1.0);
    let gate_up = rng.bf16_normal(e * 2 * i * h, 0.2);
    let down = rng.bf16_normal(e * h * i, 0.2);
    let ids = vec![5, 0, 2, 5, 1, 3];
    let weights = vec![0.7f32, 0.3, 0.5, 0.5, 0.9, 0.1];
    let gate = rng.bf16_normal(h, 0.2);
    for act in [Activation::Silu, Activation::GeluTanh] {
        let gelu = act == Activation::GeluTanh;
        let got = refmoe::expert_ffn(&x, h, &gate_up, &down, i, &ids, &weights, k, act);
        let d = FfnWeights { gate_up: &gate_up[..2 * i * h], down: &down[..h * i], inter: i };
        let dense = refmoe::dense_ffn(&x, h, &d, Some(&gate), act);
        for r in 0..t {
            let xr = &x[r * h..(r + 1) * h];
            let mut want = vec![0f64; h];
            for j in 0..k {
                let ex = ids[r * k + j] as usize;
                let f = naive::ffn_row(
                    xr,
                    &gate_up[ex * 2 * i * h..(ex + 1) * 2 * i * h],
                    &down[ex * h * i..(ex + 1) * h * i],
                    i,
                    gelu,
                );
                want.iter_mut().zip(f).for_each(|(a, v)| *a += weights[r * k + j] as f64 * v);
            }
            assert!(max_rel(&got[r * h..(r + 1) * h], &want) < 1e-5, "{act:?} routed token {r}");
            let z: f64 = xr.iter().zip(&gate).map(|(a, b)| a.to_f64() * b.to_f64()).sum();
            let g = 1.0 / (1.0 + (-z).exp());
            let want_d: Vec<f64> =
                naive::ffn_row(xr, &gate_up[..2 * i * h], &down[..h * i], i, gelu).iter().map(|v| v * g).collect();
            assert!(max_rel(&dense[r * h..(r + 1) * h], &want_d) < 1e-5, "{act:?} dense token {r}");
        }
    }
}

fn assert_ok(what: &str, o: &mc::Outcome) {
    assert!(o.passes(BF16_TOL), "{what}: {}", o.describe());
}

#[test]
fn cpu_backend_block_checks_pass() {
    let ctx = Context::new(-1).unwrap();
    let seed = Rng::fresh_seed();
    for (shape, tokens, routing, accumulate, pad, nan_token) in [
        (QWEN35.with_experts(24), 1, RoutingPattern::Random, false, 0, false),
        (QWEN35.with_experts(24), 3, RoutingPattern::Tied, true, 8, false),
        (GEMMA4.with_experts(12), 2, RoutingPattern::Random, true, 0, false),
        (GEMMA4.with_experts(12), 2, RoutingPattern::Random, false, 16, true),
    ] {
        let case = BlockCase { shape, tokens, routing, accumulate, pad, nan_token };
        let o = check_block(&ctx, Stream::NULL, &case, seed).unwrap();
        assert_ok(&format!("{case:?} seed {seed}"), &o);
    }
    for s in [QWEN35, GEMMA4] {
        assert_ok(&format!("dense {} seed {seed}", s.label), &check_dense(&ctx, Stream::NULL, &s, 3, seed).unwrap());
    }
    for pattern in [LogitPattern::Random, LogitPattern::Tied, LogitPattern::Concentrated, LogitPattern::NonFinite] {
        let case = TopkCase {
            tokens: 33,
            experts: 512,
            top_k: 16,
            pattern,
            scoring: Scoring::Softmax,
            renormalize: true,
            expert_scale: true,
        };
        let o = check_topk(&ctx, Stream::NULL, &case, seed).unwrap();
        assert!(o.passes(1e-4), "{case:?} seed {seed}: {}", o.describe());
    }
}

// ---------------------------------------------------------------------------------------------------------
// C API: bad input
// ---------------------------------------------------------------------------------------------------------

fn last_error() -> String {
    unsafe { CStr::from_ptr(sparkinfer_last_error()) }.to_string_lossy().into_owned()
}

fn expect_invalid(status: sparkinfer_status, needle: &str) {
    assert_eq!(status, SPARKINFER_STATUS_INVALID_ARGUMENT, "expected INVALID_ARGUMENT for {needle}");
    let msg = last_error();
    assert!(msg.starts_with(needle), "expected the message to name {needle:?}, got {msg:?}");
}

struct Cpu(*mut sparkinfer_context);

impl Cpu {
    fn new() -> Self {
        let mut ctx = null_mut();
        assert_eq!(sparkinfer_context_create(SPARKINFER_DEVICE_CPU, &mut ctx), SPARKINFER_STATUS_SUCCESS);
        Cpu(ctx)
    }
}

impl Drop for Cpu {
    fn drop(&mut self) {
        sparkinfer_context_destroy(self.0);
    }
}

/// Host memory, 256-byte aligned, zero-filled.
struct Host(Vec<u8>, usize);

impl Host {
    fn new(bytes: usize) -> Self {
        let v = vec![0u8; bytes + 256];
        let off = (256 - (v.as_ptr() as usize % 256)) % 256;
        Host(v, off)
    }
    fn ptr(&mut self) -> *mut c_void {
        unsafe { self.0.as_mut_ptr().add(self.1) as *mut c_void }
    }
}

/// A small valid block (H 64, E 8, k 2, I 16, dense 32) on host memory.
struct SmallBlock {
    bufs: Vec<Host>,
    params: sparkinfer_moe_forward_params,
    workspace_bytes: usize,
}

impl SmallBlock {
    fn new() -> Self {
        let (t, h, e, k, i, di) = (3i64, 64i64, 8i64, 2i64, 16i64, 32i64);
        let mut ws = 0usize;
        assert_eq!(sparkinfer_moe_forward_workspace_size(t, h, e, k, i, di, &mut ws), SPARKINFER_STATUS_SUCCESS);
        let sizes =
            [t * h * 2, t * h * 2, e * h * 2, e * 2 * i * h * 2, e * h * i * 2, 2 * di * h * 2, h * di * 2, h * 2];
        let mut bufs: Vec<Host> = sizes.iter().map(|&b| Host::new(b as usize)).collect();
        bufs.push(Host::new(ws));
        let mut rng = Rng::new(9);
        for (b, &n) in bufs.iter_mut().zip(&sizes) {
            let vals = rng.bf16_normal(n as usize / 2, 0.3);
            unsafe { std::ptr::copy_nonoverlapping(vals.as_ptr() as *const u8, b.ptr() as *mut u8, n as usize) };
        }
        let p = |bufs: &mut Vec<Host>, i: usize| bufs[i].ptr();
        let params = sparkinfer_moe_forward_params {
            x: p(&mut bufs, 0),
            x_row_stride: 0,
            out: p(&mut bufs, 1),
            out_row_stride: 0,
            accumulate: 0,
            tokens: t,
            hidden: h,
            router_weight: p(&mut bufs, 2),
            router_input_scale: null(),
            router_eps: 1e-6,
            experts: e,
            top_k: k,
            scoring: SPARKINFER_SCORING_SOFTMAX,
            renormalize: 1,
            expert_scale: null(),
            gate_up: p(&mut bufs, 3),
            down: p(&mut bufs, 4),
            inter: i,
            activation: SPARKINFER_ACTIVATION_SILU,
            dense_gate_up: p(&mut bufs, 5),
            dense_down: p(&mut bufs, 6),
            dense_inter: di,
            dense_gate_weight: p(&mut bufs, 7),
        };
        SmallBlock { bufs, params, workspace_bytes: ws }
    }

    fn run(&mut self, ctx: &Cpu, params: &sparkinfer_moe_forward_params, ws_bytes: usize) -> sparkinfer_status {
        let ws = self.bufs[8].ptr();
        sparkinfer_moe_forward(ctx.0, params, ws, ws_bytes, null_mut())
    }
}

/// A change that makes a valid block call invalid.
type Mutation = Box<dyn Fn(&mut sparkinfer_moe_forward_params)>;

#[test]
fn moe_forward_rejects_bad_input_naming_the_argument() {
    let ctx = Cpu::new();
    let mut b = SmallBlock::new();
    let good = b.params;
    let ws = b.workspace_bytes;
    assert_eq!(b.run(&ctx, &good, ws), SPARKINFER_STATUS_SUCCESS, "{}", last_error());

    let cases: Vec<(&str, Mutation)> = vec![
        ("top_k", Box::new(|p| p.top_k = 9)),
        ("top_k", Box::new(|p| p.top_k = 0)),
        ("experts", Box::new(|p| p.experts = 513)),
        ("hidden", Box::new(|p| p.hidden = 60)),
        ("inter", Box::new(|p| p.inter = 12)),
        ("dense_inter", Box::new(|p| p.dense_inter = 30)),
        ("tokens", Box::new(|p| p.tokens = 0)),
        ("activation", Box::new(|p| p.activation = 2)),
        ("scoring", Box::new(|p| p.scoring = -1)),
        ("gate_up", Box::new(|p| p.gate_up = (p.gate_up as usize + 2) as *const c_void)),
        ("down", Box::new(|p| p.down = (p.down as usize + 8) as *const c_void)),
        ("router_weight", Box::new(|p| p.router_weight = (p.router_weight as usize + 4) as *const c_void)),
        ("router_weight", Box::new(|p| p.router_weight = null())),
        ("x", Box::new(|p| p.x_row_stride = 30)),
        ("out", Box::new(|p| p.out = p.x as *mut c_void)),
        ("dense_gate_weight", Box::new(|p| p.dense_gate_weight = (p.dense_gate_weight as usize + 2) as *const c_void)),
        (
            "router_eps",
            Box::new(|p| {
                p.router_input_scale = p.dense_gate_weight;
                p.router_eps = f32::NAN;
            }),
        ),
    ];
    for (needle, mutate) in &cases {
        let mut p = good;
        mutate(&mut p);
        expect_invalid(b.run(&ctx, &p, ws), needle);
    }
    expect_invalid(b.run(&ctx, &good, ws - 1), "workspace_bytes");
    let wsp = b.bufs[8].ptr();
    expect_invalid(
        sparkinfer_moe_forward(ctx.0, &good, (wsp as usize + 4) as *mut c_void, ws, null_mut()),
        "workspace",
    );
    expect_invalid(sparkinfer_moe_forward(ctx.0, null(), wsp, ws, null_mut()), "params");
    let mut bytes = 0usize;
    expect_invalid(sparkinfer_moe_forward_workspace_size(1, 64, 600, 8, 512, 0, &mut bytes), "experts");
    expect_invalid(sparkinfer_moe_forward_workspace_size(1, 64, 16, 17, 512, 0, &mut bytes), "top_k");
    expect_invalid(sparkinfer_moe_forward_workspace_size(1, 64, 16, 8, 500, 0, &mut bytes), "inter");
    expect_invalid(sparkinfer_moe_forward_workspace_size(1, 64, 16, 8, 512, 0, null_mut()), "bytes");
}

#[test]
fn split_ops_reject_bad_input_and_match_the_block() {
    let ctx = Cpu::new();
    let mut b = SmallBlock::new();
    let q = b.params;
    let ws = b.workspace_bytes;
    assert_eq!(b.run(&ctx, &q, ws), SPARKINFER_STATUS_SUCCESS, "{}", last_error());
    let (t, e, k) = (q.tokens as usize, q.experts as usize, q.top_k as usize);
    let block_out: Vec<u16> =
        unsafe { std::slice::from_raw_parts(q.out as *const u16, t * q.hidden as usize) }.to_vec();

    let mut logits = Host::new(t * e * 4);
    let rp = sparkinfer_router_gemm_params {
        x: q.x,
        x_row_stride: 0,
        weight: q.router_weight,
        input_scale: null(),
        eps: 1e-6,
        logits: logits.ptr(),
        logits_row_stride: 0,
        tokens: q.tokens,
        hidden: q.hidden,
        experts: q.experts,
    };
    assert_eq!(sparkinfer_router_gemm(ctx.0, &rp, null_mut()), SPARKINFER_STATUS_SUCCESS, "{}", last_error());
    expect_invalid(
        sparkinfer_router_gemm(ctx.0, &sparkinfer_router_gemm_params { experts: 1000, ..rp }, null_mut()),
        "experts",
    );
    expect_invalid(
        sparkinfer_router_gemm(ctx.0, &sparkinfer_router_gemm_params { logits: q.x as *mut c_void, ..rp }, null_mut()),
        "logits",
    );

    let mut outs: Vec<Host> =
        [t * k * 4, t * k * 4, e * 4, (e + 1) * 4, t * k * 4].iter().map(|&n| Host::new(n)).collect();
    let tp = sparkinfer_topk_router_params {
        logits: logits.ptr(),
        logits_row_stride: 0,
        tokens: q.tokens,
        experts: q.experts,
        top_k: q.top_k,
        scoring: SPARKINFER_SCORING_SOFTMAX,
        renormalize: 1,
        expert_scale: null(),
        topk_ids: outs[0].ptr(),
        topk_weights: outs[1].ptr(),
        expert_counts: outs[2].ptr(),
        expert_offsets: outs[3].ptr(),
        sorted_slots: outs[4].ptr(),
    };
    assert_eq!(sparkinfer_topk_router(ctx.0, &tp, null_mut()), SPARKINFER_STATUS_SUCCESS, "{}", last_error());
    expect_invalid(
        sparkinfer_topk_router(ctx.0, &sparkinfer_topk_router_params { top_k: 9, ..tp }, null_mut()),
        "top_k",
    );
    expect_invalid(
        sparkinfer_topk_router(ctx.0, &sparkinfer_topk_router_params { scoring: 7, ..tp }, null_mut()),
        "scoring",
    );
    expect_invalid(
        sparkinfer_topk_router(ctx.0, &sparkinfer_topk_router_params { sorted_slots: outs[0].ptr(), ..tp }, null_mut()),
        "topk_ids",
    );

    let mut fws = 0usize;
    assert_eq!(
        sparkinfer_expert_ffn_workspace_size(q.tokens, q.hidden, q.top_k, q.inter, q.dense_inter, &mut fws),
        SPARKINFER_STATUS_SUCCESS
    );
    let mut ffn_ws = Host::new(fws);
    let mut out = Host::new(t * q.hidden as usize * 2);
    let fp = sparkinfer_expert_ffn_params {
        x: q.x,
        x_row_stride: 0,
        out: out.ptr(),
        out_row_stride: 0,
        accumulate: 0,
        tokens: q.tokens,
        hidden: q.hidden,
        activation: SPARKINFER_ACTIVATION_SILU,
        gate_up: q.gate_up,
        down: q.down,
        experts: q.experts,
        inter: q.inter,
        top_k: q.top_k,
        topk_ids: outs[0].ptr(),
        topk_weights: outs[1].ptr(),
        expert_offsets: outs[3].ptr(),
        sorted_slots: outs[4].ptr(),
        dense_gate_up: q.dense_gate_up,
        dense_down: q.dense_down,
        dense_inter: q.dense_inter,
        dense_gate_weight: q.dense_gate_weight,
    };
    assert_eq!(
        sparkinfer_expert_ffn(ctx.0, &fp, ffn_ws.ptr(), fws, null_mut()),
        SPARKINFER_STATUS_SUCCESS,
        "{}",
        last_error()
    );
    let split_out: Vec<u16> = unsafe { std::slice::from_raw_parts(out.ptr() as *const u16, block_out.len()) }.to_vec();
    assert_eq!(split_out, block_out, "router + top-k + expert FFN differ from the block call");

    expect_invalid(sparkinfer_expert_ffn(ctx.0, &fp, ffn_ws.ptr(), fws - 1, null_mut()), "workspace_bytes");
    expect_invalid(
        sparkinfer_expert_ffn(
            ctx.0,
            &sparkinfer_expert_ffn_params { activation: 5, ..fp },
            ffn_ws.ptr(),
            fws,
            null_mut(),
        ),
        "activation",
    );
    expect_invalid(
        sparkinfer_expert_ffn(
            ctx.0,
            &sparkinfer_expert_ffn_params { gate_up: null(), dense_gate_up: null(), ..fp },
            ffn_ws.ptr(),
            fws,
            null_mut(),
        ),
        "routed",
    );
    // An id outside [0, experts) is refused on the CPU backend (the GPU trusts the router's output).
    unsafe { *(outs[0].ptr() as *mut i32) = 8 };
    expect_invalid(sparkinfer_expert_ffn(ctx.0, &fp, ffn_ws.ptr(), fws, null_mut()), "topk_ids");
}

#[test]
fn c_example_runs_on_the_cpu_backend() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/moe_cpu-<hash> → target/<profile>, where cargo puts the cdylib.
    let lib_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    // `cargo test` links the tests against the rlib and may leave the cdylib stale: build it now.
    let mut build = std::process::Command::new(env!("CARGO"));
    build.current_dir(root).args(["build", "--lib", "--quiet"]);
    if lib_dir.ends_with("release") {
        build.arg("--release");
    }
    assert!(build.status().expect("cargo").success(), "cargo build --lib failed");
    assert!(lib_dir.join("libsparkinfer.so").exists(), "libsparkinfer.so not found in {}", lib_dir.display());
    let out = std::env::temp_dir().join(format!("sparkinfer_moe_block_{}", std::process::id()));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let status = std::process::Command::new(cc)
        .arg(root.join("examples_c/moe_block.c"))
        .arg("-I")
        .arg(root.join("include"))
        .arg("-L")
        .arg(&lib_dir)
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
        .args(["-O1", "-lsparkinfer", "-lm", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(&out)
        .status()
        .expect("C compiler");
    assert!(status.success(), "examples_c/moe_block.c failed to build");
    let run = std::process::Command::new(&out).output().unwrap();
    let _ = std::fs::remove_file(&out);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "moe_block failed:\n{stdout}\n{}", String::from_utf8_lossy(&run.stderr));
    assert!(stdout.contains("moe_block: ok"), "{stdout}");
}

#[test]
fn cpp_wrapper_header_compiles() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = std::env::temp_dir().join(format!("sparkinfer_moe_h_{}.cpp", std::process::id()));
    std::fs::write(
        &src,
        "#include <sparkinfer/kernels/moe.h>\n\
         int main() {\n\
           size_t bytes = 0;\n\
           return sparkinfer::kernels::moe_forward_workspace_size(1, 2048, 256, 8, 512, 512, &bytes) == \
         SPARKINFER_STATUS_SUCCESS && bytes > 0 ? 0 : 1;\n\
         }\n",
    )
    .unwrap();
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_string());
    let status = std::process::Command::new(cxx)
        .args(["-std=c++17", "-Wall", "-Wextra", "-Werror", "-fsyntax-only", "-I"])
        .arg(root.join("include"))
        .arg(&src)
        .status()
        .expect("C++ compiler");
    let _ = std::fs::remove_file(&src);
    assert!(status.success(), "include/sparkinfer/kernels/moe.h does not compile as C++17");
}
