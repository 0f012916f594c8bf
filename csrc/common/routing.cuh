// Top-k routing of one token by one warp and the expert index of a few slots by one block: shared by the
// top-k kernel (router.cu) and the single-token expert FFN, which routes inside its gate/up kernel.
#pragma once
#include "common/common.cuh"

constexpr int TOPK_MAX_EXPERTS = 512;
constexpr int TOPK_PER_LANE = TOPK_MAX_EXPERTS / 32;
constexpr int TOPK_MAX_K = 16;
// -inf without the toolkit's math headers.
#define NEG_INF __int_as_float(0xff800000u)

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

// A warp's selection of one token's top-k (select_top_k) and what scoring it needs, every lane's fields but
// id and logit the same.
struct Selection {
    int id;         // lanes < top_k: the expert of selection `lane`
    float logit;    // its logit (with `scores`)
    float row_max;  // the row's largest logit
    float exp_sum;  // with `scores`: the sum over every expert of exp(logit - row_max)
};

// The selection of one token's top-k by a warp, for experts <= 32 * PER_LANE.
// Lane l holds the keys of experts l, l + 32, ... and first sorts them (best first; equal keys keep the
// lower expert first: an odd-even transposition network, stable because it swaps only on a strictly better
// key). Each round then takes the warp's best head (largest key, then lower expert) with two redux.sync,
// and only the winning lane shifts its list by one: a round is a few instructions deep, so the whole
// selection is short enough to run in every block that needs it (the single-token expert FFN does). The
// logits stay in registers as loaded, so that with `scores` the softmax sum and the selected logits come
// from them, with no second read of the row.
template <int PER_LANE>
SPK_DEVICE Selection select_top_k_lanes(const float* __restrict__ logits_row, int experts, int top_k, bool scores) {
    const int lane = threadIdx.x & 31;
    unsigned key[PER_LANE];
    int id[PER_LANE];
    float logit[PER_LANE];
    float row_max = NEG_INF;
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
        const int e = i * 32 + lane;
        logit[i] = e < experts ? logits_row[e] : NEG_INF;
        key[i] = e < experts ? logit_key(logit[i]) : 0u;
        id[i] = e;
        row_max = fmaxf(row_max, logit[i]);
    }
#pragma unroll
    for (int pass = 0; pass < PER_LANE; ++pass) {
#pragma unroll
        for (int i = pass & 1; i + 1 < PER_LANE; i += 2) {
            if (key[i + 1] > key[i]) {
                const unsigned tk = key[i];
                key[i] = key[i + 1];
                key[i + 1] = tk;
                const int ti = id[i];
                id[i] = id[i + 1];
                id[i + 1] = ti;
            }
        }
    }
    Selection sel;
    sel.id = 0;
    for (int j = 0; j < top_k; ++j) {
        const unsigned top = warp_max_u32(key[0]);
        const int win = (int)warp_min_u32(key[0] == top ? (unsigned)id[0] : 0xffffffffu);
        if (id[0] == win) {
#pragma unroll
            for (int i = 0; i + 1 < PER_LANE; ++i) {
                key[i] = key[i + 1];
                id[i] = id[i + 1];
            }
            key[PER_LANE - 1] = 0u;  // absent: every expert's key is above 0
            id[PER_LANE - 1] = -1;
        }
        if (lane == j) sel.id = win;
    }
    sel.row_max = warp_reduce_max(row_max);
    sel.logit = 0.0f;
    sel.exp_sum = 0.0f;
    if (scores) {
        // Expert e's logit is logit[e / 32] of lane e % 32.
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i) {
            const float v = __shfl_sync(0xffffffffu, logit[i], sel.id & 31);
            if (i == sel.id >> 5) sel.logit = v;
        }
        float sum = 0.0f;
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i) {
            if (i * 32 + lane < experts) sum += expf(logit[i] - sel.row_max);
        }
        sel.exp_sum = warp_reduce_sum(sum);
    }
    return sel;
}

// The per-expert scale (if any) into L1 over the warp: its selected entries are read after the selection.
SPK_DEVICE void prefetch_expert_scale(const float* __restrict__ expert_scale, int experts) {
    const int lane = threadIdx.x & 31;
    if (expert_scale == nullptr) return;
    for (int e = lane * 32; e < experts; e += 32 * 32) asm volatile("prefetch.global.L1 [%0];" ::"l"(expert_scale + e));
}

// The selection of one token (NaN ranks as -inf, -0 below +0, ties to the lower expert), for experts <= 32
// * MAX_PER_LANE (a smaller bound keeps the registers of a kernel that cannot afford 16 keys per lane);
// `scores`: route_scores will follow. With expert_scale, the vector is brought into L1 for route_scores.
template <int MAX_PER_LANE = TOPK_PER_LANE>
SPK_DEVICE Selection select_top_k(const float* __restrict__ logits_row, int experts, int top_k, bool scores,
                                  const float* __restrict__ expert_scale) {
    prefetch_expert_scale(expert_scale, experts);
    if (experts <= 32) return select_top_k_lanes<1>(logits_row, experts, top_k, scores);
    if (experts <= 64) return select_top_k_lanes<2>(logits_row, experts, top_k, scores);
    if (experts <= 128) return select_top_k_lanes<4>(logits_row, experts, top_k, scores);
    if (MAX_PER_LANE <= 8 || experts <= 256) return select_top_k_lanes<8>(logits_row, experts, top_k, scores);
    return select_top_k_lanes<MAX_PER_LANE>(logits_row, experts, top_k, scores);
}

// Scores of a selection made with `scores` (softmax over every expert or sigmoid, then renormalisation and
// the per-expert scale), written with the ids to ids_row / weights_row by lanes < top_k.
SPK_DEVICE void route_scores(const Selection& sel, int top_k, int scoring, bool renormalize,
                             const float* __restrict__ expert_scale, int* __restrict__ ids_row,
                             float* __restrict__ weights_row) {
    const int lane = threadIdx.x & 31;
    float score = 0.0f;
    if (lane < top_k) {
        score = scoring == SCORING_SOFTMAX ? expf(sel.logit - sel.row_max) / sel.exp_sum
                                           : 1.0f / (1.0f + expf(-sel.logit));
    }
    if (renormalize) {
        const float total = warp_reduce_sum(lane < top_k ? score : 0.0f);
        score = score / total;
    }
    if (lane < top_k) {
        if (expert_scale != nullptr) score *= expert_scale[sel.id];
        ids_row[lane] = sel.id;
        weights_row[lane] = score;
    }
}

// Expert index of a single block's few slots (the top-k kernel's decode launch: at most 256), from the
// ids in shared memory: slot s goes to position #{q : (id_q, q) < (id_s, s)} and expert e's offset is
// #{q : id_q < e}. Each thread scans the slots once (broadcast shared reads), with no serial pass over
// warps or experts and no shared counters to clear: the same order as build_index. Threads `first` and
// up take part (the top-k kernel's single-token launch leaves warp 0 to the scores).
SPK_DEVICE void build_index_small(const int* __restrict__ sh_ids, int num_slots, int experts,
                                  int* __restrict__ counts, int* __restrict__ offsets,
                                  int* __restrict__ sorted_slots, int first = 0) {
    const int tid = (int)threadIdx.x - first;
    const int threads = (int)blockDim.x - first;
    if (tid < 0) return;
    for (int s = tid; s < num_slots; s += threads) {
        const int e = sh_ids[s];
        int rank = 0;
        for (int q = 0; q < num_slots; ++q) {
            const int eq = sh_ids[q];
            rank += (eq < e || (eq == e && q < s)) ? 1 : 0;
        }
        sorted_slots[rank] = s;
    }
    for (int e = tid; e < experts; e += threads) {
        int below = 0, count = 0;
        for (int q = 0; q < num_slots; ++q) {
            const int eq = sh_ids[q];
            below += eq < e ? 1 : 0;
            count += eq == e ? 1 : 0;
        }
        offsets[e] = below;
        counts[e] = count;
    }
    if (tid == 0) offsets[experts] = num_slots;
}

