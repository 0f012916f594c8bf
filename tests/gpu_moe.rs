//! The MoE ops on a CUDA GPU against the CPU reference, on fresh random inputs with poisoned outputs:
//! the whole block at both model shapes and T = 1 … 4096, routing patterns (all tokens tied on the same
//! experts, experts without tokens, concentrated routing), NaN inputs, the top-k router alone, the dense
//! FFN alone, the expert FFN with a caller's routing that names an expert twice, and the block captured in
//! a CUDA graph (global capture mode) replayed with new inputs.
//! Every failure names the case, the seed and the numbers.
//!
//! With SPARKINFER_TEST_SMALL set (compute-sanitizer runs, where kernels are 10–100× slower) each test keeps
//! one token count per kernel variant and path: the router GEMV (T = 1) and the tensor-core router with one
//! and four 16-token tiles per block (T ≤ 64, T ≥ 65; T = 65 leaves a block of one token), each with and
//! without the input transform, the fused and the separate expert index (T ≤ 16, T ≥ 17), the decode gate/up tiles
//! and the grouped tensor-core gate/up and down with the combine (T ≥ 33, also with several tiles per
//! expert), the decode down kernel (T ≤ 32).
//! The model shapes keep their hidden and intermediate sizes, so every loop trip count and tile tail is as
//! at full size, but hold fewer experts: generating and uploading hundreds of MiB of expert weights per case
//! would dominate the run, while the f64 oracle's cost per token does not depend on the expert count.

use sparkinfer::checks::moe::{
    check_block, check_dense, check_given_routing, check_topk, compare_block, read_routing, BlockCase, BlockWeights,
    DeviceWeights, LogitPattern, MoeShape, Outcome, RoutingPattern, TopkCase, GEMMA4, QWEN35,
};
use sparkinfer::ops::moe as ops;
use sparkinfer::ops::Stream;
use sparkinfer::reference::moe::Scoring;
use sparkinfer::runtime::graph;
use sparkinfer::testing::{Rng, TestBuffer, BF16_TOL, F32_TOL};
use sparkinfer::Context;

/// Whether SPARKINFER_TEST_SMALL asks for the reduced case lists (see the module documentation).
fn small() -> bool {
    std::env::var_os("SPARKINFER_TEST_SMALL").is_some()
}

/// Experts of the small mode's shapes: more than 32, not a multiple of 32, so that the top-k kernel's
/// per-lane loop and the grouped kernel's warp scan over experts both take a partial second round.
const SMALL_EXPERTS: usize = 48;

/// Qwen3.5 and Gemma 4, with `SMALL_EXPERTS` experts in small mode.
fn shapes() -> [MoeShape; 2] {
    if small() {
        [QWEN35.with_experts(SMALL_EXPERTS), GEMMA4.with_experts(SMALL_EXPERTS)]
    } else {
        [QWEN35, GEMMA4]
    }
}

fn gpu() -> Context {
    Context::new(0).expect("CUDA device 0")
}

/// A fresh stream of the context's device, destroyed on drop.
struct OwnedStream<'a>(&'a Context, Stream);

impl<'a> OwnedStream<'a> {
    fn new(ctx: &'a Context) -> Self {
        let raw = ctx.device("stream").unwrap().stream_create().unwrap();
        // Created just above on this context.
        OwnedStream(ctx, unsafe { Stream::from_raw(raw) })
    }
}

impl Drop for OwnedStream<'_> {
    fn drop(&mut self) {
        let _ = unsafe { self.0.device("stream").unwrap().stream_destroy(self.1.raw()) };
    }
}

fn assert_passes(what: &str, seed: u64, o: &Outcome, tol: f64) {
    assert!(o.passes(tol), "{what} (seed {seed}) failed: {}", o.describe());
}

fn block_case(shape: MoeShape, tokens: usize) -> BlockCase {
    BlockCase { shape, tokens, routing: RoutingPattern::Random, accumulate: false, pad: 0, nan_token: false }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn block_matches_reference_at_model_shapes() {
    let ctx = gpu();
    let s = OwnedStream::new(&ctx);
    let seed = Rng::fresh_seed();
    // Small mode: 512 and 4096 tokens take the same paths as 33 and 65 (grouped gate/up and down, the
    // combine; the router with four token tiles per block from 65). 1600 tokens (Qwen3.5) and 320 in small
    // mode (both shapes) have 48 to 96 slots per expert on average: the grouped kernels' 96-row tiles.
    let token_counts: &[usize] =
        if small() { &[1, 2, 7, 16, 17, 33, 65, 320] } else { &[1, 2, 7, 16, 17, 64, 512, 1600, 4096] };
    for shape in shapes() {
        let mut rng = Rng::new(seed);
        let w = BlockWeights::random(&shape, RoutingPattern::Random, &mut rng);
        let dw = DeviceWeights::upload(&ctx, &w).unwrap();
        for &tokens in token_counts {
            let case = block_case(shape, tokens);
            let o = sparkinfer::checks::moe::run_block_case(&ctx, s.1, &case, &w, &dw, &mut rng).unwrap();
            assert_passes(&format!("{} T={tokens}", shape.label), seed, &o, BF16_TOL);
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn block_routing_patterns_accumulate_strides_and_nan() {
    let ctx = gpu();
    let s = OwnedStream::new(&ctx);
    let seed = Rng::fresh_seed();
    // Every logit tied: all tokens on experts 0..k−1, every other expert empty. A NaN in token 0's input:
    // its row is NaN, its routing still valid, nothing else disturbed.
    let cases: &[(usize, RoutingPattern, bool, usize, bool)] = if small() {
        // The two tied grouped cases merged into one with two tiles per expert (65 rows); the oracle compares
        // every other token of it.
        &[
            (1, RoutingPattern::Tied, false, 0, false),
            (65, RoutingPattern::Tied, true, 8, false),
            (3, RoutingPattern::Random, true, 24, false),
            (5, RoutingPattern::Random, false, 8, true),
            (33, RoutingPattern::Random, true, 0, true),
        ]
    } else {
        &[
            (1, RoutingPattern::Tied, false, 0, false),
            (33, RoutingPattern::Tied, true, 8, false),
            (300, RoutingPattern::Tied, false, 0, false),
            (3, RoutingPattern::Random, true, 24, false),
            (5, RoutingPattern::Random, false, 8, true),
            (40, RoutingPattern::Random, true, 0, true),
        ]
    };
    for shape in shapes() {
        for &(tokens, routing, accumulate, pad, nan_token) in cases {
            let case = BlockCase { shape, tokens, routing, accumulate, pad, nan_token };
            let o = check_block(&ctx, s.1, &case, seed).unwrap();
            assert_passes(&format!("{case:?}"), seed, &o, BF16_TOL);
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn topk_router_is_exact() {
    let ctx = gpu();
    let s = OwnedStream::new(&ctx);
    let seed = Rng::fresh_seed();
    // Small mode: one token (the decode block), 16 (one block, fused index), 17 and 64 (separate index).
    let token_counts: &[usize] = if small() { &[1, 16, 17, 64] } else { &[1, 2, 16, 17, 64, 4096] };
    for &tokens in token_counts {
        for (experts, top_k) in [(256, 8), (128, 8), (512, 16), (16, 16), (8, 1)] {
            for pattern in
                [LogitPattern::Random, LogitPattern::Tied, LogitPattern::Concentrated, LogitPattern::NonFinite]
            {
                for (scoring, renormalize, expert_scale) in
                    [(Scoring::Softmax, true, false), (Scoring::Softmax, true, true), (Scoring::Sigmoid, false, false)]
                {
                    let case = TopkCase { tokens, experts, top_k, pattern, scoring, renormalize, expert_scale };
                    let o = check_topk(&ctx, s.1, &case, seed).unwrap();
                    assert_passes(&format!("{case:?}"), seed, &o, F32_TOL);
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn dense_ffn_matches_reference() {
    let ctx = gpu();
    let s = OwnedStream::new(&ctx);
    let seed = Rng::fresh_seed();
    // Small mode: 65 tokens instead of 100, still two grouped row tiles.
    let token_counts: &[usize] = if small() { &[1, 5, 16, 65] } else { &[1, 5, 16, 100] };
    for shape in shapes() {
        for &tokens in token_counts {
            let o = check_dense(&ctx, s.1, &shape, tokens, seed).unwrap();
            assert_passes(&format!("dense {} T={tokens}", shape.label), seed, &o, BF16_TOL);
        }
    }
}

/// The expert FFN with routing the caller built that names an expert twice for a token (top-k never does,
/// but the op takes any ids with a consistent index): both slots count. T = 1 runs the single-token gate/up
/// path, whose routed warps take two rows each; T = 2 the two-token tiles.
#[test]
#[ignore = "needs a CUDA GPU"]
fn given_routing_may_name_an_expert_twice() {
    let ctx = gpu();
    let s = OwnedStream::new(&ctx);
    let seed = Rng::fresh_seed();
    // Token 0 names expert 3 twice and leaves out expert 4; token 1 names expert 6 twice.
    let t1 = vec![3, 3, 0, 5, 1, 7, 2, 6];
    let t2 = [t1.clone(), vec![6, 1, 0, 6, 3, 4, 2, 5]].concat();
    for shape in shapes() {
        let shape = shape.with_experts(8);
        for ids in [&t1, &t2] {
            let o = check_given_routing(&ctx, s.1, &shape, ids, seed).unwrap();
            assert_passes(&format!("given routing {} T={}", shape.label, ids.len() / 8), seed, &o, BF16_TOL);
        }
    }
}

/// Captures the block (global capture mode: a hidden sync or allocation fails the capture), then replays
/// it with new inputs written at the captured addresses; every replay must match the reference, and the
/// replays must route differently (the expert counts live on the GPU only).
#[test]
#[ignore = "needs a CUDA GPU"]
fn block_in_a_cuda_graph_follows_new_inputs() {
    let ctx = gpu();
    let device = ctx.device("graph").unwrap();
    let s = OwnedStream::new(&ctx);
    let seed = Rng::fresh_seed();
    let [qwen, gemma] = shapes();
    // Small mode: the grouped path on the cheaper oracle's shape at 33 tokens, two replays (enough to see the
    // routing change).
    let (runs, replays) = if small() {
        ([(qwen, 1), (gemma, 1), (gemma, 8), (qwen, 33)], 2)
    } else {
        ([(qwen, 1), (gemma, 1), (qwen, 8), (gemma, 64)], 4)
    };
    for (shape, tokens) in runs {
        let mut rng = Rng::new(seed);
        let case = block_case(shape, tokens);
        let w = BlockWeights::random(&shape, RoutingPattern::Random, &mut rng);
        let dw = DeviceWeights::upload(&ctx, &w).unwrap();
        let h = shape.hidden;
        let x_buf = TestBuffer::new(&ctx, tokens * h * 2).unwrap();
        let out_buf = TestBuffer::new(&ctx, tokens * h * 2).unwrap();
        let ws_bytes = shape.block_layout(tokens).unwrap().total();
        let ws = TestBuffer::new(&ctx, ws_bytes + 256).unwrap();
        ws.poison().unwrap();
        let args = dw.block_args(&shape, tokens, (x_buf.ptr(), h), (out_buf.ptr(), h), false, (ws.ptr(), ws_bytes));
        unsafe { graph::begin_capture(device, s.1.raw()).unwrap() };
        // Buffers above hold every extent the arguments describe.
        let captured = unsafe { ops::moe_forward(&ctx, &args, s.1) };
        let g = unsafe { graph::end_capture(device, s.1.raw()) };
        captured.unwrap_or_else(|e| panic!("{} T={tokens}: the block failed under capture: {e}", shape.label));
        let g = g.unwrap();
        let mut previous_ids: Option<Vec<i32>> = None;
        let mut routings_differ = false;
        for replay in 0..replays {
            let x = rng.bf16_normal(tokens * h, 1.0);
            x_buf.upload(&x).unwrap();
            out_buf.poison().unwrap();
            unsafe { g.launch(device, s.1.raw()).unwrap() };
            s.1.synchronize(&ctx).unwrap();
            let o = compare_block(&ctx, &case, &w, &x, &x, &out_buf, &ws, ws_bytes).unwrap();
            assert_passes(&format!("graph {} T={tokens} replay {replay}", shape.label), seed, &o, BF16_TOL);
            let ids = read_routing(&ws, &shape, tokens).unwrap().ids;
            if let Some(p) = &previous_ids {
                routings_differ |= *p != ids;
            }
            previous_ids = Some(ids);
        }
        assert!(routings_differ, "{} T={tokens}: every replay routed identically (seed {seed})", shape.label);
    }
}
