// Expert FFN over routed tokens plus an optional dense (shared) FFN.
//
//   gate_up:  h[slot, i] = bf16(act(gate_e[i] . x_t) * (up_e[i] . x_t))   for every selected (token, expert)
//   down:     out[t, n]  = bf16(sum_j w_tj * down_e[n] . h[slot_tj] + gate_t * dense_down[n] . h_dense[t] (+ out))
//
// Decode (T <= 32) runs two launches on CUDA cores. The routing stays on the GPU: a block of the gate_up
// grid is a position p of the expert-sorted slot list and works only if p starts its expert's segment
// (p == expert_offsets[e]), so each selected expert's gate and up rows are read once for all its tokens,
// all experts in one launch; the other blocks exit at once. The down kernel gives each pair of warps one
// output row and walks the slots in expert-sorted order, fetching the routing of 32 slots at once and
// keeping the down rows of four slots in flight together (rows of one expert repeat only for its own
// tokens and are served by L1/L2); a single token's row is streamed in 512-byte chunks instead
// (down_row_single_token). The gate_up blocks also bring the first rows of their experts' down weights
// into L2 for the down kernel. In the MoE block call, the dense column starts before the routing is ready, and
// a single token's routing is computed inside the gate_up kernel (FusedRouting), without the top-k
// launch. Prefill (T >= 33) runs grouped GEMMs on tensor cores and a combine (further below).
// Either way the top-k sum is accumulated in fp32 in a fixed order (deterministic, no atomics) with a
// single rounding at the end.
#include "common/common.cuh"
#include "common/routing.cuh"

// gate/up: warps (one intermediate row each) per block. Small blocks with MT = 1 held to 64 registers keep
// 8 blocks (32 warps) resident per SM and give the block scheduler finer pieces to balance over the SMs.
constexpr int FFN_WARPS = 4;
// Intermediate rows per warp of a routed gate/up block with one token per tile (ops::moe).
constexpr int GATE_UP_ROUTED_ROWS_T1 = 2;
// down: DOWN_ROWS output rows per block, DOWN_SPLIT warps per row, each taking every DOWN_SPLIT-th item.
constexpr int DOWN_ROWS = 4;
constexpr int DOWN_SPLIT = 2;
constexpr int FFN_UNROLL = 4;
constexpr int ACT_SILU = 0;
constexpr int ACT_GELU_TANH = 1;

template <int ACT> SPK_DEVICE float activation(float g) {
    if (ACT == ACT_SILU) return g / (1.0f + expf(-g));
    const float k0 = 0.7978845608028654f;  // sqrt(2 / pi)
    return 0.5f * g * (1.0f + tanhf(k0 * (g + 0.044715f * g * g * g)));
}

// One warp computes intermediate row `row` (gate row `row`, up row `inter + row` of `w`) for up to MT
// tokens whose x rows are `x_rows[m]` and writes bf16(act(g) * u) to `h_rows[m] + row`.
template <int ACT, int MT>
SPK_DEVICE void gate_up_rows(const bf16_t* __restrict__ w, int inter, int hidden, int row,
                             const bf16_t* const (&x_rows)[MT], bf16_t* const (&h_rows)[MT], int nt) {
    const int lane = threadIdx.x & 31;
    const bf16_t* g_row = w + (i64)row * hidden;
    const bf16_t* u_row = w + (i64)(inter + row) * hidden;
    const int num_vec = hidden >> 3;
    const unsigned long long policy = l2_evict_first_policy();
    float acc_g[MT], acc_u[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) acc_g[m] = acc_u[m] = 0.0f;
    for (int base = 0; base < num_vec; base += 32 * FFN_UNROLL) {
        uint4 gv[FFN_UNROLL], uv[FFN_UNROLL];
#pragma unroll
        for (int u = 0; u < FFN_UNROLL; ++u) {
            const int v = base + u * 32 + lane;
            gv[u] = v < num_vec ? load_u128_stream(g_row + (i64)v * 8, policy) : make_uint4(0, 0, 0, 0);
            uv[u] = v < num_vec ? load_u128_stream(u_row + (i64)v * 8, policy) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < FFN_UNROLL; ++u) {
            const int v = base + u * 32 + lane;
            if (v < num_vec) {
                float gf[8], uf[8];
                bf16x8_to_f32(gv[u], gf);
                bf16x8_to_f32(uv[u], uf);
#pragma unroll
                for (int m = 0; m < MT; ++m) {
                    if (m < nt) {
                        float xf[8];
                        bf16x8_to_f32(load_u128_ro(x_rows[m] + (i64)v * 8), xf);
#pragma unroll
                        for (int j = 0; j < 8; ++j) {
                            acc_g[m] = fmaf(gf[j], xf[j], acc_g[m]);
                            acc_u[m] = fmaf(uf[j], xf[j], acc_u[m]);
                        }
                    }
                }
            }
        }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
        acc_g[m] = warp_reduce_sum(acc_g[m]);
        acc_u[m] = warp_reduce_sum(acc_u[m]);
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
        if (lane == m && m < nt) h_rows[m][row] = f32_to_bf16(activation<ACT>(acc_g[m]) * acc_u[m]);
    }
}

// The dense FFN's gate sigmoid(x . w_sg) of one token's x row, over a warp; every lane gets it.
SPK_DEVICE float dense_gate_of(const bf16_t* __restrict__ x_row, const bf16_t* __restrict__ w_sg, int hidden) {
    const int lane = threadIdx.x & 31;
    float acc = 0.0f;
    for (int v = lane; v < (hidden >> 3); v += 32) {
        float xf[8], wf[8];
        bf16x8_to_f32(load_u128_ro(x_row + (i64)v * 8), xf);
        bf16x8_to_f32(load_u128_ro(w_sg + (i64)v * 8), wf);
#pragma unroll
        for (int j = 0; j < 8; ++j) acc = fmaf(xf[j], wf[j], acc);
    }
    return 1.0f / (1.0f + expf(-warp_reduce_sum(acc)));
}

// The routing of a single token computed inside the gate/up kernel (the MoE block call at T = 1): logits
// non-null. Warp 0 of each routed block selects the top-k from the logits and gives the block the expert
// at its position of the sorted order; block (0, 0) also writes the routing (ids, weights, counts,
// offsets, sorted slots) that the down kernel and the caller read. This saves the top-k launch and its
// two dependent waits on the decode critical path. Layout shared with ops::moe::FusedRouting.
// Experts per lane of the fused selection: up to 256 experts (ops::moe::FUSED_ROUTING_MAX_EXPERTS) within
// the 64 registers of the single-token gate/up kernel.
constexpr int FUSED_ROUTING_PER_LANE = 8;
// The ids, offsets and sorted slots go to the kernel's own routing pointers; the weights and counts,
// which the gate/up kernel does not otherwise take, come here.
struct FusedRouting {
    const float* logits;        // [experts] fp32, or nullptr: the routing is given
    const float* expert_scale;  // per-expert weight factor, or nullptr
    float* topk_weights;        // [top_k]
    int* expert_counts;         // [experts]
    int experts, scoring, renormalize, pad;
};
static_assert(sizeof(FusedRouting) == 48, "FusedRouting: layout shared with ops::moe");

// Expert and slot of position p (< top_k) of the sorted order of one token's selection, lane j < top_k
// holding selection j's expert (distinct experts): the selection whose expert has p smaller ones.
SPK_DEVICE void sorted_position(int my_id, int top_k, int p, int& expert, int& slot) {
    const int lane = threadIdx.x & 31;
    int rank = 0;
    for (int i = 0; i < top_k; ++i) rank += __shfl_sync(0xffffffffu, my_id, i) < my_id ? 1 : 0;
    const unsigned hit = __ballot_sync(0xffffffffu, lane < top_k && rank == p);
    slot = __ffs(hit) - 1;
    expert = __shfl_sync(0xffffffffu, my_id, slot);
}

// grid.x: num_slots routed positions, plus one for the dense FFN when present; grid.y: row tiles, sized for
// the larger of the two intermediates. A dense block takes FFN_WARPS rows, one per warp; a routed block
// FFN_WARPS * ROUTED_ROWS, each warp its rows one after the other: two with one token per tile (decode at
// T = 1), so that the grid is resident in one wave (with one row per warp Qwen3.5's 1152 blocks made 1.09
// waves of 8 blocks per SM on the H100), one otherwise. The dense column keeps one row per warp: it
// streams while the routed blocks wait for the router, and fewer warps there streamed less of it.
template <int ACT, int MT>
__global__ void __launch_bounds__(FFN_WARPS * 32, MT == 1 ? 8 : 1) expert_gate_up_kernel(
    const bf16_t* __restrict__ x, i64 x_row_stride, int top_k, int hidden, const bf16_t* __restrict__ gate_up,
    int inter, int* __restrict__ topk_ids, int* __restrict__ expert_offsets, int* __restrict__ sorted_slots,
    int num_slots, bf16_t* __restrict__ h_routed, int tokens,
    const bf16_t* __restrict__ dense_gate_up, int dense_inter, const bf16_t* __restrict__ dense_gate_weight,
    bf16_t* __restrict__ h_dense, float* __restrict__ dense_gate, const bf16_t* __restrict__ down,
    const bf16_t* __restrict__ dense_down, int prefetch_rows, int dense_prefetch_rows, int early_dense,
    const __grid_constant__ FusedRouting route) {
    constexpr int ROUTED_ROWS = MT == 1 ? GATE_UP_ROUTED_ROWS_T1 : 1;
    const bool dense_block = (int)blockIdx.x >= num_slots;
    // The grid's rows are sized for the larger intermediate: routed blocks past the experts' rows have no
    // work and leave before waiting.
    const int row_tiles = (inter + FFN_WARPS * ROUTED_ROWS - 1) / (FFN_WARPS * ROUTED_ROWS);
    if (!dense_block && (int)blockIdx.y >= row_tiles) return;
    // Launched with programmatic dependent launch: the routing is written by the kernel before this one.
    // With early_dense (the MoE block call, whose router lets this launch start only after its own wait, so
    // that x is complete and no earlier kernel still reads the workspace) the dense column reads only x and
    // weights, so it starts while the routing is still being computed.
    if (!(dense_block && early_dense)) pdl_wait();
    pdl_launch_dependents();
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.y * FFN_WARPS + warp;
    const bf16_t* x_rows[MT];
    bf16_t* h_rows[MT];

    if (!dense_block) {
        const int p = blockIdx.x;
        int e, end, fused_slot = 0;
        const bool fused = MT == 1 && route.logits != nullptr;
        if (fused) {
            // Warp 0 selects; the block's other warps take its expert and slot from shared memory. Block
            // (0, 0) also scores the selection and writes the routing.
            __shared__ int sh_ids[TOPK_MAX_K];
            __shared__ int sh_pick[2];
            const bool writer = blockIdx.x == 0 && blockIdx.y == 0;
            if (warp == 0) {
                const float* scale = writer ? route.expert_scale : nullptr;
                const Selection sel =
                    select_top_k<FUSED_ROUTING_PER_LANE>(route.logits, route.experts, top_k, writer, scale);
                int pe, ps;
                sorted_position(sel.id, top_k, p, pe, ps);
                if (lane == 0) {
                    sh_pick[0] = pe;
                    sh_pick[1] = ps;
                }
                if (writer) {
                    route_scores(sel, top_k, route.scoring, route.renormalize != 0, scale, topk_ids,
                                 route.topk_weights);
                    if (lane < top_k) sh_ids[lane] = sel.id;
                }
            }
            __syncthreads();
            e = sh_pick[0];
            fused_slot = sh_pick[1];
            end = p + 1;
            if (writer)
                build_index_small(sh_ids, top_k, route.experts, route.expert_counts, expert_offsets, sorted_slots);
        } else {
            e = topk_ids[sorted_slots[p]];
            if (expert_offsets[e] != p) return;  // not the first position of its expert's segment
            end = expert_offsets[e + 1];
        }
        // The down kernel's first prefetch_rows rows of this expert, spread over the column, come into L2
        // while this kernel streams the gate/up rows.
        if (prefetch_rows > 0)
            prefetch_l2_part(down + (i64)e * hidden * inter, (i64)prefetch_rows * inter * 2, blockIdx.y, row_tiles);
        const bf16_t* w = gate_up + (i64)e * 2 * inter * hidden;
        if constexpr (ROUTED_ROWS > 1) {
            // One token per pass (MT = 1): each of the expert's slots (one, unless the caller's routing
            // names an expert twice), then each of the warp's rows.
            const int row0 = blockIdx.y * FFN_WARPS * ROUTED_ROWS + warp;
            const int row_end = min(row0 + FFN_WARPS * ROUTED_ROWS, inter);
#pragma unroll 1
            for (int q = p; q < end; ++q) {
                const int s = fused ? fused_slot : sorted_slots[q];
                x_rows[0] = x + (i64)(s / top_k) * x_row_stride;
                h_rows[0] = h_routed + (i64)s * inter;
#pragma unroll 1
                for (int r = row0; r < row_end; r += FFN_WARPS)
                    gate_up_rows<ACT, MT>(w, inter, hidden, r, x_rows, h_rows, 1);
            }
            return;
        }
        if (row >= inter) return;
        // More than MT tokens on one expert (prefill) take several passes; the rows stay in L1/L2.
        for (int q = p; q < end; q += MT) {
            const int nt = min(MT, end - q);
#pragma unroll
            for (int m = 0; m < MT; ++m) {
                const int s = sorted_slots[q + min(m, nt - 1)];
                x_rows[m] = x + (i64)(s / top_k) * x_row_stride;
                h_rows[m] = h_routed + (i64)s * inter;
            }
            gate_up_rows<ACT, MT>(w, inter, hidden, row, x_rows, h_rows, nt);
        }
        return;
    }

    // The dense FFN: every token, weight 1. The gate sigmoid(x . w_sg) of token t is computed by warp
    // t mod (warps in the dense column), so prefill spreads it over the column.
    if (dense_prefetch_rows > 0)
        prefetch_l2_part(dense_down, (i64)dense_prefetch_rows * dense_inter * 2, blockIdx.y, gridDim.y);
    if (dense_gate_weight != nullptr) {
        for (int t = row; t < tokens; t += gridDim.y * FFN_WARPS) {
            const float gate = dense_gate_of(x + (i64)t * x_row_stride, dense_gate_weight, hidden);
            if (lane == 0) dense_gate[t] = gate;
        }
    }
    if (row >= dense_inter) return;
    for (int t0 = 0; t0 < tokens; t0 += MT) {
        const int nt = min(MT, tokens - t0);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            const int t = t0 + min(m, nt - 1);
            x_rows[m] = x + (i64)t * x_row_stride;
            h_rows[m] = h_dense + (i64)t * dense_inter;
        }
        gate_up_rows<ACT, MT>(dense_gate_up, dense_inter, hidden, row, x_rows, h_rows, nt);
    }
}

constexpr int DOWN_GROUP = 4;

// Dots of up to DOWN_GROUP (row, vector) pairs of lengths len[g] (0 = absent) over a warp; every lane gets
// the sums. The loads of all rows are issued before the first use: at decode the rows belong to different
// experts, independent DRAM reads whose latencies overlap instead of adding up.
SPK_DEVICE void warp_dot_group(const bf16_t* const (&w)[DOWN_GROUP], const bf16_t* const (&h)[DOWN_GROUP],
                               const int (&len)[DOWN_GROUP], float (&out)[DOWN_GROUP]) {
    const int lane = threadIdx.x & 31;
    int max_vec = 0;
#pragma unroll
    for (int g = 0; g < DOWN_GROUP; ++g) max_vec = max(max_vec, len[g] >> 3);
    float acc[DOWN_GROUP];
#pragma unroll
    for (int g = 0; g < DOWN_GROUP; ++g) acc[g] = 0.0f;
    const unsigned long long policy = l2_evict_first_policy();
    // One 16-byte load per row per step keeps DOWN_GROUP loads in flight per lane within 85 registers, so
    // that three blocks of 8 warps (24 warps) stay resident per SM without spilling.
    for (int base = 0; base < max_vec; base += 32) {
        uint4 wv[DOWN_GROUP];
        const int v = base + lane;
#pragma unroll
        for (int g = 0; g < DOWN_GROUP; ++g)
            wv[g] = v < (len[g] >> 3) ? load_u128_stream(w[g] + (i64)v * 8, policy) : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int g = 0; g < DOWN_GROUP; ++g) {
            if (v < (len[g] >> 3)) {
                float wf[8], hf[8];
                bf16x8_to_f32(wv[g], wf);
                bf16x8_to_f32(load_u128(h[g] + (i64)v * 8), hf);
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[g] = fmaf(wf[j], hf[j], acc[g]);
            }
        }
    }
#pragma unroll
    for (int g = 0; g < DOWN_GROUP; ++g) out[g] = warp_reduce_sum(acc[g]);
}

// Vectors of 8 elements per chunk of the single-token down row: one 16-byte load per lane.
constexpr int DOWN_CHUNK = 32;

// Part `part` of output row n at T = 1, summed over the warp (every lane gets it). The row's items (the k
// routed slots in slot order, then the dense FFN: at most 17, one per lane) are cut into chunks of
// DOWN_CHUNK vectors numbered item by item; the part takes chunks part, part + DOWN_SPLIT, ... and runs
// them GROUP at a time with all their loads in flight (ops::moe::down_single_group picks 4 or 5). A long
// row (Gemma 4's dense down, 264 vectors) is so spread over the parts and streamed several loads deep, where
// one item per group would stream it one load per lane at a time. Each lane adds scale x its products in
// chunk order; one warp sum at the end.
template <int GROUP>
SPK_DEVICE float down_row_single_token(int n, int part, int top_k, int hidden, const bf16_t* __restrict__ down,
                                       int inter, const int* __restrict__ topk_ids,
                                       const float* __restrict__ topk_weights, const bf16_t* __restrict__ h_routed,
                                       const bf16_t* __restrict__ dense_down, int dense_inter,
                                       const bf16_t* __restrict__ h_dense, const float* __restrict__ dense_gate) {
    const int lane = threadIdx.x & 31;
    const int n_routed = top_k;
    const int n_items = n_routed + (dense_down != nullptr ? 1 : 0);
    const bf16_t* my_w = nullptr;
    const bf16_t* my_h = nullptr;
    float my_scale = 0.0f;
    if (lane < n_routed) {
        // One token: its slots are 0 .. k-1, so the ids and weights are read in one round trip, not
        // through sorted_slots first.
        my_w = down + ((i64)topk_ids[lane] * hidden + n) * inter;
        my_h = h_routed + (i64)lane * inter;
        my_scale = topk_weights[lane];
    } else if (lane < n_items) {
        my_w = dense_down + (i64)n * dense_inter;
        my_h = h_dense;
        my_scale = dense_gate != nullptr ? dense_gate[0] : 1.0f;
    }
    const int routed_chunks = (inter / 8 + DOWN_CHUNK - 1) / DOWN_CHUNK;
    const int routed_total = n_routed * routed_chunks;
    const int total = routed_total + (n_items - n_routed) * ((dense_inter / 8 + DOWN_CHUNK - 1) / DOWN_CHUNK);
    const unsigned long long policy = l2_evict_first_policy();
    float acc = 0.0f;
    for (int q0 = part; q0 < total; q0 += GROUP * DOWN_SPLIT) {
        uint4 wv[GROUP], hv[GROUP];
        int item[GROUP], vec[GROUP];
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
            // Chunk q: vectors [step * DOWN_CHUNK, + DOWN_CHUNK) of item j; past the last chunk, nothing.
            const int q = q0 + g * DOWN_SPLIT;
            int j = 0, step = 0, vecs = 0;
            if (q < routed_total) {
                j = q / routed_chunks;
                step = q - j * routed_chunks;
                vecs = inter / 8;
            } else if (q < total) {
                j = n_routed;
                step = q - routed_total;
                vecs = dense_inter / 8;
            }
            const bf16_t* w = (const bf16_t*)__shfl_sync(0xffffffffu, (unsigned long long)my_w, j);
            const int v = step * DOWN_CHUNK + lane;
            item[g] = j;
            vec[g] = v < vecs ? v : -1;
            wv[g] = v < vecs ? load_u128_stream(w + (i64)v * 8, policy) : make_uint4(0, 0, 0, 0);
        }
        // h was written by gate_up just before (L2 hits): issued after every weight load.
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
            const bf16_t* h = (const bf16_t*)__shfl_sync(0xffffffffu, (unsigned long long)my_h, item[g]);
            hv[g] = vec[g] >= 0 ? load_u128(h + (i64)vec[g] * 8) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
            float wf[8], hf[8];
            bf16x8_to_f32(wv[g], wf);
            bf16x8_to_f32(hv[g], hf);
            float d = 0.0f;
#pragma unroll
            for (int k = 0; k < 8; ++k) d = fmaf(wf[k], hf[k], d);
            acc = fmaf(__shfl_sync(0xffffffffu, my_scale, item[g]), d, acc);
        }
    }
    return warp_reduce_sum(acc);
}

// grid.x: tiles of DOWN_ROWS output rows, for at most 32 tokens. Warp w of a block works on output row
// w % DOWN_ROWS and takes part w / DOWN_ROWS of its items (every DOWN_SPLIT-th), so twice the warps stream
// at once and each has half the serial chain of dependent loads. Lane m accumulates token m; every part
// adds its terms in expert-sorted order (at T = 1 in slot order, in chunks: down_row_single_token), then the
// dense terms; the parts are summed in part order, then the existing output: a fixed order, so results are
// deterministic.
// SINGLE_GROUP > 0: the T = 1 path with that many chunks in flight per warp. It holds four blocks per SM
// (64 registers), so that Qwen3.5's 512 row tiles run in one wave on the H100 where three per SM made 1.29
// waves; six chunks spill at 64. The general path (0) keeps three blocks (85 registers: it spills at 64).
template <int SINGLE_GROUP>
__global__ void __launch_bounds__(DOWN_ROWS * DOWN_SPLIT * 32, SINGLE_GROUP > 0 ? 4 : 3) expert_down_kernel(
    int tokens, int top_k, int hidden, const bf16_t* __restrict__ down, int inter, const int* __restrict__ topk_ids,
    const float* __restrict__ topk_weights, const int* __restrict__ sorted_slots, int num_slots,
    const bf16_t* __restrict__ h_routed, const bf16_t* __restrict__ dense_down, int dense_inter,
    const bf16_t* __restrict__ h_dense, const float* __restrict__ dense_gate, bf16_t* __restrict__ out,
    i64 out_row_stride, int accumulate) {
    __shared__ float partial[DOWN_SPLIT][DOWN_ROWS][32];
    // Launched with programmatic dependent launch: h and the routing come from the kernels before this one.
    pdl_wait();
    pdl_launch_dependents();
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int row_local = warp % DOWN_ROWS;
    const int part = warp / DOWN_ROWS;
    const int n = blockIdx.x * DOWN_ROWS + row_local;
    const bool row_ok = n < hidden;
    const int nt = tokens;
    float acc = 0.0f;

    if constexpr (SINGLE_GROUP > 0) {
        if (row_ok)
            acc = down_row_single_token<SINGLE_GROUP>(n, part, top_k, hidden, down, inter, topk_ids,
                                                      topk_weights, h_routed, dense_down, dense_inter, h_dense,
                                                      dense_gate);
    } else if (row_ok) {
        // The items are every routed slot in sorted order, then the dense FFN per token. Lanes fetch the
        // routing of 32 items at once, then the warp runs its items (positions part, part + DOWN_SPLIT, ...
        // of the 32) DOWN_GROUP at a time with all their row loads in flight.
        const int n_items = num_slots + (dense_down != nullptr ? nt : 0);
        for (int base = 0; base < n_items; base += 32) {
            const int it = base + lane;
            const bf16_t* my_w = nullptr;
            const bf16_t* my_h = nullptr;
            int my_len = 0;
            float my_scale = 0.0f;
            int my_target = -1;
            if (it < num_slots) {
                const int s = sorted_slots[it];
                const int e = topk_ids[s];
                my_w = down + ((i64)e * hidden + n) * inter;
                my_h = h_routed + (i64)s * inter;
                my_len = inter;
                my_scale = topk_weights[s];
                my_target = s / top_k;
            } else if (it < n_items) {
                const int m = it - num_slots;
                my_w = dense_down + (i64)n * dense_inter;
                my_h = h_dense + (i64)m * dense_inter;
                my_len = dense_inter;
                my_scale = dense_gate != nullptr ? dense_gate[m] : 1.0f;
                my_target = m;
            }
            const int count = min(32, n_items - base);
            for (int j0 = part; j0 < count; j0 += DOWN_GROUP * DOWN_SPLIT) {
                const bf16_t* w[DOWN_GROUP];
                const bf16_t* h[DOWN_GROUP];
                int len[DOWN_GROUP];
                float d[DOWN_GROUP];
#pragma unroll
                for (int g = 0; g < DOWN_GROUP; ++g) {
                    // Positions past the batch are absent (length 0); the source lane is clamped so that
                    // the shuffle never wraps around onto another item.
                    const int j = j0 + g * DOWN_SPLIT;
                    const int src = min(j, 31);
                    w[g] = (const bf16_t*)__shfl_sync(0xffffffffu, (unsigned long long)my_w, src);
                    h[g] = (const bf16_t*)__shfl_sync(0xffffffffu, (unsigned long long)my_h, src);
                    const int l = __shfl_sync(0xffffffffu, my_len, src);
                    len[g] = j < count ? l : 0;
                }
                warp_dot_group(w, h, len, d);
#pragma unroll
                for (int g = 0; g < DOWN_GROUP; ++g) {
                    const int j = j0 + g * DOWN_SPLIT;
                    const int src = min(j, 31);
                    const float scale = __shfl_sync(0xffffffffu, my_scale, src);
                    const int target = __shfl_sync(0xffffffffu, my_target, src);
                    if (j < count && lane == target) acc = fmaf(scale, d[g], acc);
                }
            }
        }
    }
    partial[part][row_local][lane] = acc;
    __syncthreads();
    if (part == 0 && row_ok && lane < nt) {
        float sum = partial[0][row_local][lane];
#pragma unroll
        for (int q = 1; q < DOWN_SPLIT; ++q) sum += partial[q][row_local][lane];
        bf16_t* o = out + (i64)lane * out_row_stride + n;
        if (accumulate) sum += bf16_to_f32(*o);
        *o = f32_to_bf16(sum);
    }
}

// ---------------------------------------------------------------------------------------------------------
// Prefill (T >= 33): grouped GEMMs on tensor cores (mma.sync m16n8k16 bf16 -> fp32, ldmatrix, cp.async),
// then a combine.
//
//   gate_up:  h[slot]      = bf16(act(x_t . gate_e) * (x_t . up_e))        for every slot, and the dense FFN
//   down:     y[slot]      = h[slot] . down_e^T   (fp32, one row per slot)  and y[slots + t] for the dense FFN
//   combine:  out[t]       = bf16(sum_j w_tj y[t k + j] + gate_t y[slots + t] (+ out[t]))
//
// A block of a grouped kernel computes a BM x GG_BN tile for one group: a routed expert (its rows are
// BM consecutive positions of its segment of the expert-sorted slot list) or the dense FFN (group
// `experts`, rows are tokens). The grid is sized from host bounds: blockIdx.x enumerates the tiles of
// every group (sum over experts of ceil(count / BM) <= ceil(T k / BM) + experts, then
// ceil(T / BM) dense tiles); warp 0 finds its block's group and tile from the offsets, and blocks past
// the last tile exit. Counts never leave the GPU. The per-slot fp32 rows of the down GEMM are summed by
// the combine in slot order, so the top-k sum is in fp32 with one rounding and in a fixed order.
// BM is 64 or 96 (ops::moe::grouped_rows picks it from the mean tokens per expert: 96 where an expert's
// tokens would spill into a second, nearly empty 64-row tile that reads its weights again).
// 4 warps in 2 x 2: warp (wm, wn) owns tile rows wm * BM / 2 .. + BM / 2 and B rows wn * 32 .. + 32 of each half
// q of the B tile (gate_up: q = 0 gate, q = 1 up, the same 64 columns of the intermediate; down: 128
// consecutive output columns). Shared rows are padded by 16 bytes to 144: the 8 rows an ldmatrix reads fall
// in distinct banks.
// ---------------------------------------------------------------------------------------------------------
#include "common/mma.cuh"

constexpr int GG_BN = 128;  // B rows per tile
// k tiles of 64: each row of a stage is 128 contiguous bytes of one weight row, which streams from DRAM at
// 85% of copy bandwidth at qwen3.5 T = 64 where 32 (64-byte pieces) reached 61%.
constexpr int GG_BK = 64;
constexpr int GG_STAGES = 3;
constexpr int GG_THREADS = 128;

// Shared memory of a grouped kernel (dynamic, 83 KiB at BM = 64, 97 KiB at 96; ops::moe::grouped_shared_bytes
// computes the same size): each stage holds GG_BK / 8 chunks of 16 bytes per row, rows padded by 16 bytes.
template <int BM> struct GroupedShared {
    static_assert(BM == 64 || BM == 96, "tile rows: two warp rows of 2 or 3 m16 tiles");
    static constexpr int LD = GG_BK + 8;
    bf16_t a[GG_STAGES][BM][LD];
    bf16_t b[GG_STAGES][GG_BN][LD];
    const bf16_t* a_rows[BM];     // nullptr: row past the group's end (zero-filled)
    const bf16_t* b_rows[GG_BN];  // nullptr: column past the end (zero-filled)
    void* out_rows[BM];           // the epilogue's destination row of each tile row
    int group, tile;
};

// Warp 0 of the block: sets s.group / s.tile of block b (group -1: no tile, the block exits).
template <int BM>
SPK_DEVICE void grouped_find_tile(GroupedShared<BM>& s, const int* __restrict__ expert_offsets, int experts, bool dense,
                                  int tokens, int b) {
    const int lane = threadIdx.x & 31;
    // Tiles of experts e0 .. e0 + 31 by a warp scan, until the running total passes b.
    int group = -1, tile = 0, base = 0;
    for (int e0 = 0; e0 < experts && base <= b; e0 += 32) {
        const int e = e0 + lane;
        const int cnt = e < experts ? expert_offsets[e + 1] - expert_offsets[e] : 0;
        const int nt = (cnt + BM - 1) / BM;
        int incl = nt;
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
            const int v = __shfl_up_sync(0xffffffffu, incl, off);
            if (lane >= off) incl += v;
        }
        const int excl = base + incl - nt;
        if (b >= excl && b < excl + nt) {
            group = e;
            tile = b - excl;
        }
        base += __shfl_sync(0xffffffffu, incl, 31);
    }
    const unsigned found = __ballot_sync(0xffffffffu, group >= 0);
    if (found != 0) {
        const int src = __ffs(found) - 1;
        group = __shfl_sync(0xffffffffu, group, src);
        tile = __shfl_sync(0xffffffffu, tile, src);
    } else {
        // No routed tile: base is the routed total (the loop ran over every expert).
        tile = b - base;
        group = (dense && tile * BM < tokens) ? experts : -1;
    }
    if (lane == 0) {
        s.group = group;
        s.tile = tile;
    }
}

// The dynamic shared memory of a grouped kernel, checked against the launch's size.
template <int BM> SPK_DEVICE GroupedShared<BM>& grouped_shared() {
    extern __shared__ uint4 shared_raw[];
    if (dynamic_shared_bytes() < sizeof(GroupedShared<BM>)) __trap();
    return *reinterpret_cast<GroupedShared<BM>*>(shared_raw);
}

// The rows of a block's tile: positions [p0, min(p0 + BM, end)) of a routed expert's segment of the
// sorted slots, or tokens of the dense FFN; group < 0: the block has no tile.
struct GroupedRange {
    int group;
    bool routed;
    int p0, end;
};

// Finds this block's tile (warp 0) and publishes it to the block; reads the offsets, so it runs after
// pdl_wait().
template <int BM>
SPK_DEVICE GroupedRange grouped_range(GroupedShared<BM>& s, const int* __restrict__ expert_offsets, int experts,
                                      bool dense, int tokens) {
    if ((threadIdx.x >> 5) == 0) grouped_find_tile(s, expert_offsets, experts, dense, tokens, blockIdx.x);
    __syncthreads();
    GroupedRange g;
    g.group = s.group;
    g.routed = g.group < experts;
    g.p0 = g.end = 0;
    if (g.group < 0) return g;
    g.p0 = (g.routed ? expert_offsets[g.group] : 0) + s.tile * BM;
    g.end = g.routed ? expert_offsets[g.group + 1] : tokens;
    return g;
}

// acc[q][mi][ni][f] += A . B^T over k in [0, K) for the tile rows s.a_rows and B rows s.b_rows (both
// set and published by a barrier before the call); `dummy` is any valid global address (the source of
// zero-filled copies). K is a multiple of 8.
template <int BM>
SPK_DEVICE void grouped_mma(GroupedShared<BM>& s, int K, const bf16_t* dummy, float (&acc)[2][BM / 32][4][4]) {
    constexpr int MI = BM / 32;  // m16 tiles per warp
    constexpr int BK = GG_BK;
    constexpr int CH = BK / 8;  // 16-byte chunks per row and stage
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int num_k = (K + BK - 1) / BK;
    // Stage st <- k tile kt: A is BM rows x CH chunks of 16 bytes, B 128 rows x CH chunks. A thread copies
    // chunk c = tid % CH of rows tid / CH + i GG_THREADS / CH, the same for every k tile: its source
    // pointers (at the chunk, nullptr for a zero-filled row) are read from shared memory once.
    constexpr int AI = BM * CH / GG_THREADS, BI = GG_BN * CH / GG_THREADS, RS = GG_THREADS / CH;
    const int c = tid % CH, r0 = tid / CH;
    const bf16_t* a_src[AI];
    const bf16_t* b_src[BI];
#pragma unroll
    for (int i = 0; i < AI; ++i) {
        const bf16_t* src = s.a_rows[r0 + i * RS];
        a_src[i] = src != nullptr ? src + c * 8 : nullptr;
    }
#pragma unroll
    for (int i = 0; i < BI; ++i) {
        const bf16_t* src = s.b_rows[r0 + i * RS];
        b_src[i] = src != nullptr ? src + c * 8 : nullptr;
    }
    auto load_tile = [&](int st, int kt) {
        const int k = kt * BK;
        const bool k_ok = k + c * 8 < K;
#pragma unroll
        for (int i = 0; i < AI; ++i) {
            const bool ok = a_src[i] != nullptr && k_ok;
            cp_async_16(&s.a[st][r0 + i * RS][c * 8], ok ? a_src[i] + k : dummy, ok);
        }
#pragma unroll
        for (int i = 0; i < BI; ++i) {
            const bool ok = b_src[i] != nullptr && k_ok;
            cp_async_16_l2_256(&s.b[st][r0 + i * RS][c * 8], ok ? b_src[i] + k : dummy, ok);
        }
    };
#pragma unroll
    for (int st = 0; st < GG_STAGES - 1; ++st) {
        if (st < num_k) load_tile(st, st);
        cp_async_commit();
    }
    const int wm = warp & 1, wn = warp >> 1;
    for (int kt = 0; kt < num_k; ++kt) {
        // Group kt (one is committed per k tile, empty ones included) has landed; the barrier also
        // retires every warp's reads of the stage that the next load overwrites (tile kt - 1's).
        cp_async_wait<GG_STAGES - 2>();
        __syncthreads();
        const int next = kt + GG_STAGES - 1;
        if (next < num_k) load_tile(next % GG_STAGES, next);
        cp_async_commit();
        const int st = kt % GG_STAGES;
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
            unsigned a[MI][4];
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
                ldmatrix_x4(a[mi], &s.a[st][wm * (BM / 2) + mi * 16 + (lane & 15)][kk * 16 + (lane >> 4) * 8]);
#pragma unroll
            for (int q = 0; q < 2; ++q) {
#pragma unroll
                for (int nj = 0; nj < 2; ++nj) {
                    unsigned bq[4];
                    const int row = q * (GG_BN / 2) + wn * 32 + nj * 16 + ((lane >> 4) << 3) + (lane & 7);
                    ldmatrix_x4(bq, &s.b[st][row][kk * 16 + ((lane >> 3) & 1) * 8]);
#pragma unroll
                    for (int mi = 0; mi < MI; ++mi) {
                        mma_bf16_16816(acc[q][mi][nj * 2], a[mi], bq[0], bq[1]);
                        mma_bf16_16816(acc[q][mi][nj * 2 + 1], a[mi], bq[2], bq[3]);
                    }
                }
            }
        }
    }
    cp_async_wait<0>();
}

template <int MI> SPK_DEVICE void zero_acc(float (&acc)[2][MI][4][4]) {
#pragma unroll
    for (int q = 0; q < 2; ++q)
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
            for (int ni = 0; ni < 4; ++ni)
#pragma unroll
                for (int f = 0; f < 4; ++f) acc[q][mi][ni][f] = 0.0f;
}

// grid.x: the group tiles (see above); grid.y: tiles of GG_BN / 2 intermediate columns, sized for the
// larger intermediate. The B tile is the gate rows [n0, n0 + 64) and the up rows [inter + n0, ...) of the
// group's weights, so the epilogue has gate and up of the same element in one thread.
template <int ACT, int BM>
__global__ void __launch_bounds__(GG_THREADS) grouped_gate_up_kernel(
    const bf16_t* __restrict__ x, i64 x_row_stride, int top_k, int hidden, const bf16_t* __restrict__ gate_up,
    int inter, const int* __restrict__ expert_offsets, const int* __restrict__ sorted_slots, int experts,
    bf16_t* __restrict__ h_routed, int tokens, const bf16_t* __restrict__ dense_gate_up, int dense_inter,
    const bf16_t* __restrict__ dense_gate_weight, bf16_t* __restrict__ h_dense, float* __restrict__ dense_gate) {
    constexpr int MI = BM / 32;
    GroupedShared<BM>& s = grouped_shared<BM>();
    bf16_t** h_rows = reinterpret_cast<bf16_t**>(s.out_rows);
    // Launched with programmatic dependent launch: the routing is written by the kernel before this one.
    pdl_wait();
    pdl_launch_dependents();
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const GroupedRange g = grouped_range(s, expert_offsets, experts, dense_gate_up != nullptr, tokens);
    if (g.group < 0) return;
    const int group = g.group, p0 = g.p0, end = g.end;
    const bool routed = g.routed;
    const int I = routed ? inter : dense_inter;
    const bf16_t* w = routed ? gate_up + (i64)group * 2 * inter * hidden : dense_gate_up;
    const int n0 = blockIdx.y * (GG_BN / 2);

    if (!routed && blockIdx.y == 0 && dense_gate_weight != nullptr) {
        // The dense gate sigmoid(x . w_sg) of this tile's tokens, a warp per token.
        for (int m = warp; m < min(BM, end - p0); m += GG_THREADS / 32) {
            const int t = p0 + m;
            const float gate = dense_gate_of(x + (i64)t * x_row_stride, dense_gate_weight, hidden);
            if (lane == 0) dense_gate[t] = gate;
        }
    }
    if (n0 >= I) return;

    for (int r = tid; r < BM; r += GG_THREADS) {
        const int p = p0 + r;
        const bf16_t* a = nullptr;
        bf16_t* h = nullptr;
        if (p < end) {
            if (routed) {
                const int slot = sorted_slots[p];
                a = x + (i64)(slot / top_k) * x_row_stride;
                h = h_routed + (i64)slot * inter;
            } else {
                a = x + (i64)p * x_row_stride;
                h = h_dense + (i64)p * dense_inter;
            }
        }
        s.a_rows[r] = a;
        h_rows[r] = h;
    }
    for (int r = tid; r < GG_BN; r += GG_THREADS) {
        const int col = n0 + (r & (GG_BN / 2 - 1));
        s.b_rows[r] = col < I ? w + ((r < GG_BN / 2 ? 0 : (i64)I) + col) * hidden : nullptr;
    }
    __syncthreads();

    float acc[2][MI][4][4];  // [gate/up][mi][ni][fragment]
    zero_acc(acc);
    grouped_mma(s, hidden, x, acc);

    const int wm = warp & 1, wn = warp >> 1;
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int r = wm * (BM / 2) + mi * 16 + (lane >> 2) + half * 8;
            bf16_t* h = h_rows[r];
            if (h == nullptr) continue;
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
                const int col = n0 + wn * 32 + ni * 8 + 2 * (lane & 3);
                if (col < I) {
                    const float g0 = acc[0][mi][ni][half * 2], g1 = acc[0][mi][ni][half * 2 + 1];
                    const float u0 = acc[1][mi][ni][half * 2], u1 = acc[1][mi][ni][half * 2 + 1];
                    *reinterpret_cast<unsigned*>(h + col) =
                        pack_bf16x2(activation<ACT>(g0) * u0, activation<ACT>(g1) * u1);
                }
            }
        }
    }
}

// grid.x: the group tiles (see above); grid.y: tiles of GG_BN output columns. y has hidden columns; the
// row of routed slot s is s, the dense row of token t is num_slots + t.
template <int BM>
__global__ void __launch_bounds__(GG_THREADS) grouped_down_kernel(
    int hidden, const bf16_t* __restrict__ down, int inter, const int* __restrict__ expert_offsets,
    const int* __restrict__ sorted_slots, int experts, int num_slots, const bf16_t* __restrict__ h_routed,
    int tokens, const bf16_t* __restrict__ dense_down, int dense_inter, const bf16_t* __restrict__ h_dense,
    float* __restrict__ y) {
    constexpr int MI = BM / 32;
    GroupedShared<BM>& s = grouped_shared<BM>();
    float** y_rows = reinterpret_cast<float**>(s.out_rows);
    // Launched with programmatic dependent launch: h comes from the kernel before this one.
    pdl_wait();
    pdl_launch_dependents();
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const GroupedRange g = grouped_range(s, expert_offsets, experts, dense_down != nullptr, tokens);
    if (g.group < 0) return;
    const int group = g.group, p0 = g.p0, end = g.end;
    const bool routed = g.routed;
    const int K = routed ? inter : dense_inter;
    const bf16_t* w = routed ? down + (i64)group * hidden * inter : dense_down;
    const int n0 = blockIdx.y * GG_BN;

    for (int r = tid; r < BM; r += GG_THREADS) {
        const int p = p0 + r;
        const bf16_t* a = nullptr;
        float* yr = nullptr;
        if (p < end) {
            const int row = routed ? sorted_slots[p] : num_slots + p;
            a = routed ? h_routed + (i64)row * inter : h_dense + (i64)p * dense_inter;
            yr = y + (i64)row * hidden;
        }
        s.a_rows[r] = a;
        y_rows[r] = yr;
    }
    for (int r = tid; r < GG_BN; r += GG_THREADS) {
        const int col = n0 + r;
        s.b_rows[r] = col < hidden ? w + (i64)col * K : nullptr;
    }
    __syncthreads();

    float acc[2][MI][4][4];  // [column half][mi][ni][fragment]
    zero_acc(acc);
    grouped_mma(s, K, w, acc);

    const int wm = warp & 1, wn = warp >> 1;
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int r = wm * (BM / 2) + mi * 16 + (lane >> 2) + half * 8;
            float* yr = y_rows[r];
            if (yr == nullptr) continue;
#pragma unroll
            for (int q = 0; q < 2; ++q) {
#pragma unroll
                for (int ni = 0; ni < 4; ++ni) {
                    const int col = n0 + q * (GG_BN / 2) + wn * 32 + ni * 8 + 2 * (lane & 3);
                    if (col < hidden)
                        *reinterpret_cast<float2*>(yr + col) =
                            make_float2(acc[q][mi][ni][half * 2], acc[q][mi][ni][half * 2 + 1]);
                }
            }
        }
    }
}

// out[t, n] = bf16(sum_j w[t k + j] y[t k + j][n] + gate_t y[num_slots + t][n] (+ out[t, n])), the terms
// in that order. grid (tokens, column chunks of 4 * FFN_COMBINE_THREADS); a thread takes 4 columns.
// num_slots 0: no routed experts; dense 0: no dense FFN; dense_gate nullptr: dense weight 1.
constexpr int FFN_COMBINE_THREADS = 128;

__global__ void __launch_bounds__(FFN_COMBINE_THREADS) ffn_combine_kernel(
    int hidden, int top_k, int num_slots, const float* __restrict__ topk_weights, int dense,
    const float* __restrict__ dense_gate, const float* __restrict__ y, bf16_t* __restrict__ out, i64 out_row_stride,
    int accumulate) {
    // Launched with programmatic dependent launch: y comes from the kernel before this one.
    pdl_wait();
    pdl_launch_dependents();
    const int t = blockIdx.x;
    const int n = (blockIdx.y * FFN_COMBINE_THREADS + threadIdx.x) * 4;
    if (n >= hidden) return;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    auto add_row = [&](i64 row, float wt) {
        const float4 v = *reinterpret_cast<const float4*>(y + row * hidden + n);
        acc[0] = fmaf(wt, v.x, acc[0]);
        acc[1] = fmaf(wt, v.y, acc[1]);
        acc[2] = fmaf(wt, v.z, acc[2]);
        acc[3] = fmaf(wt, v.w, acc[3]);
    };
    if (num_slots > 0) {
        for (int j = 0; j < top_k; ++j) {
            const i64 slot = (i64)t * top_k + j;
            add_row(slot, topk_weights[slot]);
        }
    }
    if (dense) add_row((i64)num_slots + t, dense_gate != nullptr ? dense_gate[t] : 1.0f);
    bf16_t* o = out + (i64)t * out_row_stride + n;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        float v = acc[e];
        if (accumulate) v += bf16_to_f32(o[e]);
        o[e] = f32_to_bf16(v);
    }
}
