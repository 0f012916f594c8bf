// MoE routing: router GEMM (logits = x . Wr^T, optional Gemma 4 input transform), top-k selection with
// softmax or sigmoid scoring, and the expert index (counts, exclusive offsets, token slots grouped by
// expert) -- all in GPU memory, so nothing is read back by the host.
#include "common/common.cuh"
#include "common/mma.cuh"
#include "common/routing.cuh"

constexpr int ROUTER_WARPS = 4;
// Loads per lane in flight per row: a whole row up to hidden = 3072 (Gemma 4's 2816 included) in one go.
constexpr int ROUTER_UNROLL = 12;
constexpr int TOPK_WARPS = 16;

// ---------------------------------------------------------------------------------------------------------
// Router GEMV for one token (decode). One warp owns one expert row of Wr and has the whole row in flight
// at once (up to hidden = 3072); blocks of 4 warps spread the rows over more SMs. grid.y is the token. With
// TRANSFORM the input is RMSNorm-without-weight(x) * scale * H^-0.5 (Gemma 4): the factor rsqrt(mean(x^2) +
// eps) * H^-0.5 is pulled out of the dot product, so only x * scale enters the inner loop, and the norm
// comes from the warp's own loads of x (every warp reads all of it), reduced over the warp. Launch bounds
// as the tensor-core router's below (without the minimum, ptxas spilled 4 bytes on sm_100 and later).
// ---------------------------------------------------------------------------------------------------------
template <bool TRANSFORM>
__global__ void __launch_bounds__(ROUTER_WARPS * 32, 1) router_gemv_kernel(
    const bf16_t* __restrict__ x, i64 x_row_stride, const bf16_t* __restrict__ w, const bf16_t* __restrict__ scale,
    float eps, float* __restrict__ logits, i64 logits_row_stride, int tokens, int experts, int hidden,
    int trigger_first) {
    const int lane = threadIdx.x & 31;
    const int t = blockIdx.y;
    const int num_vec = hidden >> 3;
    const bf16_t* xt = x + (i64)t * x_row_stride;
    const int row = blockIdx.x * ROUTER_WARPS + (threadIdx.x >> 5);
    const bf16_t* w_row = w + (i64)(row < experts ? row : 0) * hidden;
    // Launched with programmatic dependent launch: the row comes into L2 while the kernel before finishes.
    // The next kernel waits for this grid's completion before it reads the logits, so it may be scheduled
    // at once (trigger_first: the router op); the MoE block's gate/up kernel, whose dense column starts
    // without waiting, is let in only once the kernel before this one is complete.
    if (row < experts) prefetch_l2_lines(w_row, (i64)hidden * 2, lane, 32);
    if (trigger_first) pdl_launch_dependents();
    pdl_wait();
    if (!trigger_first) pdl_launch_dependents();
    if (row >= experts) return;
    // The row's weights, x and the scale are all loaded before the first use. Every warp reads the whole of
    // x, so with TRANSFORM it sums x^2 from the same loads: the norm needs no block reduction. The products
    // go into four accumulators (a quarter of the dependent chain of one), added at the end.
    float acc4[4] = {0.0f, 0.0f, 0.0f, 0.0f}, ss = 0.0f;
    for (int base = 0; base < num_vec; base += 32 * ROUTER_UNROLL) {
        uint4 wv[ROUTER_UNROLL], xv[ROUTER_UNROLL], sv[TRANSFORM ? ROUTER_UNROLL : 1];
#pragma unroll
        for (int u = 0; u < ROUTER_UNROLL; ++u) {
            const int v = base + u * 32 + lane;
            wv[u] = v < num_vec ? load_u128_stream(w_row + (i64)v * 8) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < ROUTER_UNROLL; ++u) {
            const int v = base + u * 32 + lane;
            xv[u] = v < num_vec ? load_u128_ro(xt + (i64)v * 8) : make_uint4(0, 0, 0, 0);
            if (TRANSFORM) sv[u] = v < num_vec ? load_u128_ro(scale + (i64)v * 8) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < ROUTER_UNROLL; ++u) {
            float wf[8], xf[8];
            bf16x8_to_f32(wv[u], wf);
            bf16x8_to_f32(xv[u], xf);
            if (TRANSFORM) {
                float sf[8];
                bf16x8_to_f32(sv[u], sf);
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    ss = fmaf(xf[j], xf[j], ss);
                    wf[j] *= sf[j];
                }
            }
#pragma unroll
            for (int j = 0; j < 8; ++j) acc4[j & 3] = fmaf(wf[j], xf[j], acc4[j & 3]);
        }
    }
    const float acc = warp_reduce_sum((acc4[0] + acc4[1]) + (acc4[2] + acc4[3]));
    if (TRANSFORM) ss = warp_reduce_sum(ss);
    const float factor = TRANSFORM ? rsqrtf(ss / (float)hidden + eps) * rsqrtf((float)hidden) : 1.0f;
    if (lane == 0) logits[(i64)t * logits_row_stride + row] = acc * factor;
}

// ---------------------------------------------------------------------------------------------------------
// Router GEMM on tensor cores, for more than one token: a block computes 16 tokens x 16 experts with
// mma.sync m16n8k16 (bf16 in, fp32 accumulators), its 8 warps splitting the hidden dimension (warp w takes
// the 32-wide k steps w, w + 8, ...), then sums the warps' partial tiles in warp order through shared
// memory: deterministic, and the weights are read once per 16 tokens instead of once per token.
// Fragments come straight from global memory (L1/L2): lane (g, c) loads 16 bytes at k = k0 + 8c of rows g
// and g + 8 of x and of Wr, which feed two k16 steps. The k order inside a step is permuted the same way
// for both operands (the physical k of logical 2c, 2c+1, 2c+8, 2c+9 are 8c .. 8c+3 in the first step,
// 8c+4 .. 8c+7 in the second), which leaves the dot products unchanged.
// With TRANSFORM the product x * scale (exact in fp32) enters as two bf16 operands, hi = bf16(p) and
// lo = bf16(p - hi), so the input keeps about 16 bits of precision; the squares of x for the norm are
// summed from the same loads.
// ---------------------------------------------------------------------------------------------------------
constexpr int ROUTER_MMA_WARPS = 8;

// a (4 bf16 pairs) times the matching scale pairs, split into hi and lo bf16 pairs; ss += x^2.
SPK_DEVICE void scale_split(const uint4& x, const uint4& sc, uint4& hi, uint4& lo, float& ss) {
    const unsigned xs[4] = {x.x, x.y, x.z, x.w};
    const unsigned ws[4] = {sc.x, sc.y, sc.z, sc.w};
    unsigned h[4], l[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float x0, x1, s0, s1;
        unpack_bf16x2(xs[i], x0, x1);
        unpack_bf16x2(ws[i], s0, s1);
        ss = fmaf(x0, x0, fmaf(x1, x1, ss));
        const float p0 = x0 * s0, p1 = x1 * s1;
        h[i] = pack_bf16x2(p0, p1);
        float h0, h1;
        unpack_bf16x2(h[i], h0, h1);
        l[i] = pack_bf16x2(p0 - h0, p1 - h1);
    }
    hi = make_uint4(h[0], h[1], h[2], h[3]);
    lo = make_uint4(l[0], l[1], l[2], l[3]);
}

// acc[n] += (16 x 32 block a of the two x rows) . (16 x 32 block w of the two Wr rows)^T, as two k16 steps.
SPK_DEVICE void router_mma_step(float (&acc)[2][4], const uint4& a_g, const uint4& a_g8, const uint4& w_g,
                                const uint4& w_g8) {
    const unsigned a0[4] = {a_g.x, a_g8.x, a_g.y, a_g8.y};
    const unsigned a1[4] = {a_g.z, a_g8.z, a_g.w, a_g8.w};
    mma_bf16_16816(acc[0], a0, w_g.x, w_g.y);
    mma_bf16_16816(acc[1], a0, w_g8.x, w_g8.y);
    mma_bf16_16816(acc[0], a1, w_g.z, w_g.w);
    mma_bf16_16816(acc[1], a1, w_g8.z, w_g8.w);
}

// grid (ceil(experts / 16), ceil(tokens / (16 MT))): MT tiles of 16 tokens share each load of the weights.
// The minimum of one block per SM in the launch bounds lifts the register budget that ptxas otherwise chose
// (it spilled at 128 registers on sm_100 and later); the grid is what fills the SMs here.
template <int MT, bool TRANSFORM>
__global__ void __launch_bounds__(ROUTER_MMA_WARPS * 32, 1) router_mma_kernel(
    const bf16_t* __restrict__ x, i64 x_row_stride, const bf16_t* __restrict__ w, const bf16_t* __restrict__ scale,
    float eps, float* __restrict__ logits, i64 logits_row_stride, int tokens, int experts, int hidden) {
    constexpr int ROWS = 16 * MT;
    __shared__ float part[ROUTER_MMA_WARPS][ROWS][17];
    __shared__ float part_ss[ROUTER_MMA_WARPS][ROWS];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int g = lane >> 2, c = lane & 3;
    const int e0 = blockIdx.x * 16, t0 = blockIdx.y * ROWS;
    // The block's weight rows into L2 before the wait (when launched with programmatic dependent launch: the
    // router op; the MoE block launches it in stream order). The top-k launch may be scheduled at once: it
    // waits for this grid to finish.
    prefetch_l2_lines(w + (i64)e0 * hidden, (i64)(min(experts - e0, 16) * hidden) * 2, threadIdx.x, blockDim.x);
    pdl_launch_dependents();
    pdl_wait();
    // Token rows t0 + 8 j + g (j = 2m for row g of tile m, 2m + 1 for row g + 8), expert rows e0 + g, + 8.
    bool x_ok[2 * MT];
    const bf16_t* x_row[2 * MT];
#pragma unroll
    for (int j = 0; j < 2 * MT; ++j) {
        const int t = t0 + 8 * j + g;
        x_ok[j] = t < tokens;
        x_row[j] = x + (i64)(x_ok[j] ? t : 0) * x_row_stride;
    }
    const bool w_ok[2] = {e0 + g < experts, e0 + g + 8 < experts};
    const bf16_t* w_row[2] = {w + (i64)(w_ok[0] ? e0 + g : 0) * hidden, w + (i64)(w_ok[1] ? e0 + g + 8 : 0) * hidden};
    const uint4 zero = make_uint4(0, 0, 0, 0);

    float acc[MT][2][4];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int f = 0; f < 4; ++f) acc[m][n][f] = 0.0f;
    float ss[2 * MT];
#pragma unroll
    for (int j = 0; j < 2 * MT; ++j) ss[j] = 0.0f;
    const int steps = (hidden + 31) / 32;
    // Two steps per trip with MT = 1, their loads issued together.
    constexpr int U = MT == 1 ? 2 : 1;
    for (int s0 = warp; s0 < steps; s0 += U * ROUTER_MMA_WARPS) {
        uint4 xa[U][2 * MT], wb[U][2], sc[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int k = (s0 + u * ROUTER_MMA_WARPS) * 32 + 8 * c;
            const bool k_ok = s0 + u * ROUTER_MMA_WARPS < steps && k < hidden;
#pragma unroll
            for (int j = 0; j < 2 * MT; ++j) xa[u][j] = k_ok && x_ok[j] ? load_u128_ro(x_row[j] + k) : zero;
#pragma unroll
            for (int h = 0; h < 2; ++h) wb[u][h] = k_ok && w_ok[h] ? load_u128_ro(w_row[h] + k) : zero;
            if (TRANSFORM) sc[u] = k_ok ? load_u128_ro(scale + k) : zero;
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
#pragma unroll
            for (int m = 0; m < MT; ++m) {
                if (TRANSFORM) {
                    uint4 hi[2], lo[2];
#pragma unroll
                    for (int h = 0; h < 2; ++h) scale_split(xa[u][2 * m + h], sc[u], hi[h], lo[h], ss[2 * m + h]);
                    router_mma_step(acc[m], hi[0], hi[1], wb[u][0], wb[u][1]);
                    router_mma_step(acc[m], lo[0], lo[1], wb[u][0], wb[u][1]);
                } else {
                    router_mma_step(acc[m], xa[u][2 * m], xa[u][2 * m + 1], wb[u][0], wb[u][1]);
                }
            }
        }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int f = 0; f < 4; ++f) part[warp][16 * m + g + 8 * (f >> 1)][n * 8 + 2 * c + (f & 1)] = acc[m][n][f];
    if (TRANSFORM) {
#pragma unroll
        for (int j = 0; j < 2 * MT; ++j) {
            ss[j] += __shfl_xor_sync(0xffffffffu, ss[j], 1);
            ss[j] += __shfl_xor_sync(0xffffffffu, ss[j], 2);
            if (c == 0) part_ss[warp][8 * j + g] = ss[j];
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < ROWS * 16; i += ROUTER_MMA_WARPS * 32) {
        const int r = i >> 4, col = i & 15;
        if (t0 + r >= tokens || e0 + col >= experts) continue;
        float sum = 0.0f;
#pragma unroll
        for (int q = 0; q < ROUTER_MMA_WARPS; ++q) sum += part[q][r][col];
        if (TRANSFORM) {
            float sq = 0.0f;
#pragma unroll
            for (int q = 0; q < ROUTER_MMA_WARPS; ++q) sq += part_ss[q][r];
            sum *= rsqrtf(sq / (float)hidden + eps) * rsqrtf((float)hidden);
        }
        logits[(i64)(t0 + r) * logits_row_stride + e0 + col] = sum;
    }
}

// The top-k selection of one token by a warp and build_index_small are in common/routing.cuh.

// ---------------------------------------------------------------------------------------------------------
// Expert index over the T*k slots (slot = token * k + j), built by one block of TOPK_WARPS warps: warp w
// owns a contiguous range of slots. Pass 1 counts per (warp, expert) with __match_any_sync (one leader per
// expert per step, so no two threads touch the same counter); the counts are scanned over warps and
// experts; pass 2 places each slot at its expert's offset plus its rank, so the order inside an expert is
// ascending slot: deterministic, no atomics.
// ---------------------------------------------------------------------------------------------------------
struct IndexShared {
    int per_warp[TOPK_WARPS][TOPK_MAX_EXPERTS];
    int warp_sums[TOPK_WARPS];
};

// The ids of slots base + 32 u + lane (u < INDEX_BATCH), -1 at and past `end`: one batch of independent
// loads instead of a dependent load per step (each step of a pass waits on its ids otherwise).
constexpr int INDEX_BATCH = 8;

SPK_DEVICE void load_id_batch(const int* __restrict__ ids, int base, int end, int (&batch)[INDEX_BATCH]) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int u = 0; u < INDEX_BATCH; ++u) {
        const int s = base + u * 32 + lane;
        batch[u] = s < end ? ids[s] : -1;
    }
}

SPK_DEVICE void build_index(const int* __restrict__ ids, int num_slots, int experts, int* __restrict__ counts,
                            int* __restrict__ offsets, int* __restrict__ sorted_slots, IndexShared& sh) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    for (int i = threadIdx.x; i < TOPK_WARPS * TOPK_MAX_EXPERTS; i += blockDim.x) (&sh.per_warp[0][0])[i] = 0;
    __syncthreads();
    const int per_warp = (num_slots + TOPK_WARPS - 1) / TOPK_WARPS;
    const int begin = warp * per_warp;
    const int end = min(num_slots, begin + per_warp);
    const unsigned lanes_below = (1u << lane) - 1;
    for (int base = begin; base < end; base += 32 * INDEX_BATCH) {
        int batch[INDEX_BATCH];
        load_id_batch(ids, base, end, batch);
#pragma unroll
        for (int u = 0; u < INDEX_BATCH; ++u) {
            const int e = batch[u];
            const unsigned peers = __match_any_sync(0xffffffffu, e);
            if (e >= 0 && (peers & lanes_below) == 0) sh.per_warp[warp][e] += __popc(peers);
            // Another lane may lead the same expert next step: order its read after this write.
            __syncwarp();
        }
    }
    __syncthreads();

    // Thread e turns its column into exclusive prefixes over warps; then a block scan over experts.
    int total = 0;
    const int e = threadIdx.x;
    if (e < experts) {
        for (int w = 0; w < TOPK_WARPS; ++w) {
            const int c = sh.per_warp[w][e];
            sh.per_warp[w][e] = total;
            total += c;
        }
        counts[e] = total;
    }
    int inclusive = total;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const int n = __shfl_up_sync(0xffffffffu, inclusive, off);
        if (lane >= off) inclusive += n;
    }
    if (lane == 31) sh.warp_sums[warp] = inclusive;
    __syncthreads();
    int warp_base = 0;
    for (int w = 0; w < warp; ++w) warp_base += sh.warp_sums[w];
    const int exclusive = warp_base + inclusive - total;
    if (e < experts) {
        offsets[e] = exclusive;
        if (e == experts - 1) offsets[experts] = exclusive + total;
        for (int w = 0; w < TOPK_WARPS; ++w) sh.per_warp[w][e] += exclusive;
    }
    __syncthreads();

    for (int base = begin; base < end; base += 32 * INDEX_BATCH) {
        int batch[INDEX_BATCH];
        load_id_batch(ids, base, end, batch);
#pragma unroll
        for (int u = 0; u < INDEX_BATCH; ++u) {
            const int s = base + u * 32 + lane;
            const int ex = batch[u];
            const unsigned peers = __match_any_sync(0xffffffffu, ex);
            if (ex >= 0) sorted_slots[sh.per_warp[warp][ex] + __popc(peers & lanes_below)] = s;
            __syncwarp();
            if (ex >= 0 && (peers & lanes_below) == 0) sh.per_warp[warp][ex] += __popc(peers);
            __syncwarp();
        }
    }
}

// Slots whose ids a single-block launch keeps in shared memory for build_index_small.
constexpr int SMALL_INDEX_SLOTS = TOPK_WARPS * 16;

// One warp per token. With a single block (T <= TOPK_WARPS, the decode case) the same launch also builds
// the index from the ids it keeps in shared memory, saving a launch on the critical path; otherwise
// expert_index_kernel follows. The decode launch may have fewer than TOPK_WARPS warps (one per token).
// PER_LANE: experts per lane (ops::moe::topk_name: the smallest of 1, 2, 4, 8, 16 with 32 PER_LANE >=
// experts, as select_top_k picks). Only that selection is compiled in, which keeps the warp's code short:
// at one token the kernel is that warp's chain, and instruction fetch was among its longest stalls. With
// one token the block is warp 0 for the token and a thread per expert for the index (ops::moe), which is
// built while warp 0 scores the selection, instead of after it. Launched with programmatic dependent
// launch: nothing is read before pdl_wait().
template <int PER_LANE>
__global__ void __launch_bounds__(TOPK_WARPS * 32) topk_router_kernel(
    const float* __restrict__ logits, i64 logits_row_stride, int tokens, int experts, int top_k, int scoring,
    int renormalize, const float* __restrict__ expert_scale, int* __restrict__ topk_ids,
    float* __restrict__ topk_weights, int* __restrict__ counts, int* __restrict__ offsets,
    int* __restrict__ sorted_slots, int build_index_here) {
    __shared__ int sh_ids[SMALL_INDEX_SLOTS];
    // The next kernel may be scheduled at once: each waits for this grid's completion before it reads the
    // routing, and the expert FFN's dense column (which needs none) runs meanwhile.
    pdl_launch_dependents();
    pdl_wait();
    const int lane = threadIdx.x & 31;
    const int t = blockIdx.x * TOPK_WARPS + (threadIdx.x >> 5);
    Selection sel;
    if (t < tokens) {
        prefetch_expert_scale(expert_scale, experts);
        sel = select_top_k_lanes<PER_LANE>(logits + (i64)t * logits_row_stride, experts, top_k, true);
        if (build_index_here && lane < top_k) sh_ids[t * top_k + lane] = sel.id;
    }
    if (build_index_here) __syncthreads();
    if (t < tokens)
        route_scores(sel, top_k, scoring, renormalize != 0, expert_scale, topk_ids + (i64)t * top_k,
                     topk_weights + (i64)t * top_k);
    if (build_index_here) {
        const int index_from = tokens == 1 && blockDim.x > 32 ? 32 : 0;
        build_index_small(sh_ids, tokens * top_k, experts, counts, offsets, sorted_slots, index_from);
    }
}

__global__ void __launch_bounds__(TOPK_WARPS * 32)
    expert_index_kernel(const int* __restrict__ topk_ids, int num_slots, int experts, int* __restrict__ counts,
                        int* __restrict__ offsets, int* __restrict__ sorted_slots) {
    __shared__ IndexShared sh;
    pdl_wait();
    pdl_launch_dependents();
    build_index(topk_ids, num_slots, experts, counts, offsets, sorted_slots, sh);
}
