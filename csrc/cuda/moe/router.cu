// MoE routing: router GEMM (logits = x . Wr^T, optional Gemma 4 input transform), top-k selection with
// softmax or sigmoid scoring, and the expert index (counts, exclusive offsets, token slots grouped by
// expert) -- all in GPU memory, so nothing is read back by the host.
#include "common/common.cuh"

constexpr int ROUTER_WARPS = 8;
constexpr int ROUTER_UNROLL = 8;
constexpr int TOPK_WARPS = 16;
constexpr int TOPK_MAX_EXPERTS = 512;
constexpr int TOPK_PER_LANE = TOPK_MAX_EXPERTS / 32;
// -inf without the toolkit's math headers.
#define NEG_INF __int_as_float(0xff800000u)

// ---------------------------------------------------------------------------------------------------------
// Router GEMM. One warp owns one expert row of Wr and MT tokens: at decode the kernel is bound by reading Wr
// once, like the GEMV. With TRANSFORM the input is RMSNorm-without-weight(x) * scale * H^-0.5 (Gemma 4):
// the per-token factor rsqrt(mean(x^2) + eps) * H^-0.5 is pulled out of the dot product, so only
// x * scale enters the inner loop and the norm costs one block reduction per token.
// ---------------------------------------------------------------------------------------------------------
template <int MT, bool TRANSFORM>
__global__ void __launch_bounds__(ROUTER_WARPS * 32) router_gemm_kernel(
    const bf16_t* __restrict__ x, i64 x_row_stride, const bf16_t* __restrict__ w, const bf16_t* __restrict__ scale,
    float eps, float* __restrict__ logits, i64 logits_row_stride, int tokens, int experts, int hidden) {
    __shared__ float row_factor[MT];
    __shared__ float reduce_scratch[32];
    // The top-k kernel that follows (programmatic dependent launch) may be scheduled now: it waits for this
    // grid's completion before reading the logits, so only its launch latency is hidden.
    pdl_launch_dependents();
    const int lane = threadIdx.x & 31;
    const int t0 = blockIdx.y * MT;
    const int nt = min(MT, tokens - t0);
    const int num_vec = hidden >> 3;
    const bf16_t* xb = x + (i64)t0 * x_row_stride;

    if (TRANSFORM) {
        // Every block recomputes the norm of its tokens: MT rows of x are a few KiB from L2, cheaper than
        // a separate launch.
        for (int m = 0; m < nt; ++m) {
            float ss = 0.0f;
            for (int v = threadIdx.x; v < num_vec; v += blockDim.x) {
                float xf[8];
                bf16x8_to_f32(load_u128_ro(xb + m * x_row_stride + (i64)v * 8), xf);
#pragma unroll
                for (int j = 0; j < 8; ++j) ss = fmaf(xf[j], xf[j], ss);
            }
            ss = block_reduce_sum(ss, reduce_scratch);
            if (threadIdx.x == 0) row_factor[m] = rsqrtf(ss / (float)hidden + eps) * rsqrtf((float)hidden);
        }
        __syncthreads();
    }

    const int row = blockIdx.x * ROUTER_WARPS + (threadIdx.x >> 5);
    if (row >= experts) return;
    const bf16_t* w_row = w + (i64)row * hidden;
    float acc[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[m] = 0.0f;

    for (int base = 0; base < num_vec; base += 32 * ROUTER_UNROLL) {
        uint4 wv[ROUTER_UNROLL];
#pragma unroll
        for (int u = 0; u < ROUTER_UNROLL; ++u) {
            const int v = base + u * 32 + lane;
            wv[u] = v < num_vec ? load_u128_stream(w_row + (i64)v * 8) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < ROUTER_UNROLL; ++u) {
            const int v = base + u * 32 + lane;
            if (v < num_vec) {
                float wf[8];
                bf16x8_to_f32(wv[u], wf);
                if (TRANSFORM) {
                    float sf[8];
                    bf16x8_to_f32(load_u128_ro(scale + (i64)v * 8), sf);
#pragma unroll
                    for (int j = 0; j < 8; ++j) wf[j] *= sf[j];
                }
#pragma unroll
                for (int m = 0; m < MT; ++m) {
                    if (m < nt) {
                        float xf[8];
                        bf16x8_to_f32(load_u128_ro(xb + m * x_row_stride + (i64)v * 8), xf);
#pragma unroll
                        for (int j = 0; j < 8; ++j) acc[m] = fmaf(wf[j], xf[j], acc[m]);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[m] = warp_reduce_sum(acc[m]);
#pragma unroll
    for (int m = 0; m < MT; ++m) {
        if (lane == m && m < nt) {
            const float f = TRANSFORM ? row_factor[m] : 1.0f;
            logits[(i64)(t0 + m) * logits_row_stride + row] = acc[m] * f;
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Top-k. One warp per token; lane l holds the logits of experts l, l + 32, ... Selection ranks raw logits
// (softmax and sigmoid are monotonic, so this is the ranking of the scores, and CPU and GPU rank the same
// fp32 values identically); NaN ranks as -inf, -0 below +0; ties go to the lower expert index.
// ---------------------------------------------------------------------------------------------------------
// Scoring codes (SPARKINFER_SCORING_*): 0 softmax, anything else (1) sigmoid.
constexpr int SCORING_SOFTMAX = 0;

// Order-preserving key of a logit for redux.sync: a larger logit gets a larger key, NaN ranks as -inf, and
// -0 ranks below +0, the order of the CPU reference (f32::total_cmp). Every logit's key is above 0, which
// marks an absent or already selected expert.
SPK_DEVICE unsigned logit_key(float l) {
    if (l != l) l = NEG_INF;
    const unsigned b = __float_as_uint(l);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

SPK_DEVICE unsigned warp_max_u32(unsigned v) {
    unsigned r;
    asm volatile("redux.sync.max.u32 %0, %1, 0xffffffff;" : "=r"(r) : "r"(v));
    return r;
}

SPK_DEVICE unsigned warp_min_u32(unsigned v) {
    unsigned r;
    asm volatile("redux.sync.min.u32 %0, %1, 0xffffffff;" : "=r"(r) : "r"(v));
    return r;
}

// This lane's best remaining key and its expert (ties to the lower expert, i.e. the lower i), by a tree of
// depth log2(TOPK_PER_LANE) rather than a serial scan.
SPK_DEVICE void lane_best(const unsigned (&key)[TOPK_PER_LANE], int lane, unsigned& best_key, int& best_e) {
    unsigned k[TOPK_PER_LANE];
    int id[TOPK_PER_LANE];
#pragma unroll
    for (int i = 0; i < TOPK_PER_LANE; ++i) {
        k[i] = key[i];
        id[i] = i * 32 + lane;
    }
#pragma unroll
    for (int s = 1; s < TOPK_PER_LANE; s <<= 1) {
#pragma unroll
        for (int i = 0; i + s < TOPK_PER_LANE; i += 2 * s) {
            if (k[i + s] > k[i]) {
                k[i] = k[i + s];
                id[i] = id[i + s];
            }
        }
    }
    best_key = k[0];
    best_e = id[0];
}

// Returns the expert of selection `lane` in lanes < top_k. Each round takes the warp's best (logit, then
// lower expert) with two redux.sync (max key, then min expert among the lanes holding it); only the winning
// lane's best changes.
SPK_DEVICE int route_token(const float* __restrict__ logits_row, int experts, int top_k, int scoring,
                            bool renormalize, const float* __restrict__ expert_scale, int* __restrict__ ids_row,
                            float* __restrict__ weights_row) {
    const int lane = threadIdx.x & 31;
    unsigned key[TOPK_PER_LANE];
    float row_max = NEG_INF;
#pragma unroll
    for (int i = 0; i < TOPK_PER_LANE; ++i) {
        const int e = i * 32 + lane;
        const float l = e < experts ? logits_row[e] : NEG_INF;
        key[i] = e < experts ? logit_key(l) : 0u;
        row_max = fmaxf(row_max, l);
    }
    if (expert_scale != nullptr) {
        // Its selected entries are read after the selection: bring the vector into L1 meanwhile.
        for (int e = lane * 32; e < experts; e += 32 * 32)
            asm volatile("prefetch.global.L1 [%0];" ::"l"(expert_scale + e));
    }
    unsigned best_key;
    int best_e;
    lane_best(key, lane, best_key, best_e);
    int my_id = 0;
    for (int j = 0; j < top_k; ++j) {
        const unsigned top = warp_max_u32(best_key);
        const int win = (int)warp_min_u32(best_key == top ? (unsigned)best_e : 0xffffffffu);
        if ((win & 31) == lane) {
#pragma unroll
            for (int i = 0; i < TOPK_PER_LANE; ++i) {
                if (i == (win >> 5)) key[i] = 0u;
            }
            lane_best(key, lane, best_key, best_e);
        }
        if (lane == j) my_id = win;
    }

    float score = 0.0f;
    if (scoring == SCORING_SOFTMAX) {
        row_max = warp_reduce_max(row_max);
        float sum = 0.0f;
#pragma unroll
        for (int i = 0; i < TOPK_PER_LANE; ++i) {
            const int e = i * 32 + lane;
            if (e < experts) sum += expf(logits_row[e] - row_max);
        }
        sum = warp_reduce_sum(sum);
        if (lane < top_k) score = expf(logits_row[my_id] - row_max) / sum;
    } else if (lane < top_k) {
        score = 1.0f / (1.0f + expf(-logits_row[my_id]));
    }
    if (renormalize) {
        const float total = warp_reduce_sum(lane < top_k ? score : 0.0f);
        score = score / total;
    }
    if (lane < top_k) {
        if (expert_scale != nullptr) score *= expert_scale[my_id];
        ids_row[lane] = my_id;
        weights_row[lane] = score;
    }
    return my_id;
}

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
    for (int base = begin; base < end; base += 32) {
        const int s = base + lane;
        const int e = s < end ? ids[s] : -1;
        const unsigned peers = __match_any_sync(0xffffffffu, e);
        if (e >= 0 && (peers & lanes_below) == 0) sh.per_warp[warp][e] += __popc(peers);
        // Another lane may lead the same expert next step: order its read after this write.
        __syncwarp();
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

    for (int base = begin; base < end; base += 32) {
        const int s = base + lane;
        const int ex = s < end ? ids[s] : -1;
        const unsigned peers = __match_any_sync(0xffffffffu, ex);
        if (ex >= 0) sorted_slots[sh.per_warp[warp][ex] + __popc(peers & lanes_below)] = s;
        __syncwarp();
        if (ex >= 0 && (peers & lanes_below) == 0) sh.per_warp[warp][ex] += __popc(peers);
        __syncwarp();
    }
}

// Expert index of a single block's few slots (T <= TOPK_WARPS, so at most 16 * 16 = 256 slots), from the
// ids in shared memory: slot s goes to position #{q : (id_q, q) < (id_s, s)} and expert e's offset is
// #{q : id_q < e}. Each thread scans the slots once (broadcast shared reads), with no serial pass over
// warps or experts and no shared counters to clear: the same order as build_index.
constexpr int SMALL_INDEX_SLOTS = TOPK_WARPS * 16;

SPK_DEVICE void build_index_small(const int* __restrict__ sh_ids, int num_slots, int experts,
                                  int* __restrict__ counts, int* __restrict__ offsets,
                                  int* __restrict__ sorted_slots) {
    for (int s = threadIdx.x; s < num_slots; s += blockDim.x) {
        const int e = sh_ids[s];
        int rank = 0;
        for (int q = 0; q < num_slots; ++q) {
            const int eq = sh_ids[q];
            rank += (eq < e || (eq == e && q < s)) ? 1 : 0;
        }
        sorted_slots[rank] = s;
    }
    for (int e = threadIdx.x; e < experts; e += blockDim.x) {
        int below = 0, count = 0;
        for (int q = 0; q < num_slots; ++q) {
            const int eq = sh_ids[q];
            below += eq < e ? 1 : 0;
            count += eq == e ? 1 : 0;
        }
        offsets[e] = below;
        counts[e] = count;
    }
    if (threadIdx.x == 0) offsets[experts] = num_slots;
}

// One warp per token. With a single block (T <= TOPK_WARPS, the decode case) the same launch also builds
// the index from the ids it keeps in shared memory, saving a launch on the critical path; otherwise
// expert_index_kernel follows. The decode launch may have fewer than TOPK_WARPS warps (one per token).
// Launched with programmatic dependent launch: nothing is read before pdl_wait().
__global__ void __launch_bounds__(TOPK_WARPS * 32) topk_router_kernel(
    const float* __restrict__ logits, i64 logits_row_stride, int tokens, int experts, int top_k, int scoring,
    int renormalize, const float* __restrict__ expert_scale, int* __restrict__ topk_ids,
    float* __restrict__ topk_weights, int* __restrict__ counts, int* __restrict__ offsets,
    int* __restrict__ sorted_slots, int build_index_here) {
    __shared__ int sh_ids[SMALL_INDEX_SLOTS];
    pdl_wait();
    pdl_launch_dependents();
    const int lane = threadIdx.x & 31;
    const int t = blockIdx.x * TOPK_WARPS + (threadIdx.x >> 5);
    if (t < tokens) {
        const int id = route_token(logits + (i64)t * logits_row_stride, experts, top_k, scoring, renormalize != 0,
                                   expert_scale, topk_ids + (i64)t * top_k, topk_weights + (i64)t * top_k);
        if (build_index_here && lane < top_k) sh_ids[t * top_k + lane] = id;
    }
    if (build_index_here) {
        __syncthreads();
        build_index_small(sh_ids, tokens * top_k, experts, counts, offsets, sorted_slots);
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
