// Attention against a bf16 KV cache: flash decode of 1 to 8 new query tokens per sequence, split over the
// key range (split-KV) so that one sequence fills the GPU, then merged by log-sum-exp; and, at the end of
// the file, tensor-core prefill of up to 8192 tokens with the same parameters and masking.
//
// Decode runs on tensor cores (flash_decode_mma_kernel below): one CTA per (sequence, KV head, chunk of 16
// rows) and split, where the rows are the query heads of the KV head's GQA group times the new tokens
// (row = token * group + head_in_group), so every K/V tile is read once for the chunk's rows.
// Sequence lengths are read on the GPU, so the same launch (and a graph captured of it) stays correct as
// they change: the grid is sized from the host-known bound and CTAs whose key range is empty exit early.
//
// Masking, for the query token t of a sequence of length L with Tq new tokens at positions p_t = L - Tq + t:
// key j is visible iff j < L, (not causal or j <= p_t) and (no window or j > p_t - W). A row with no visible
// key gets a zero output and lse = -inf (length 0 included), never NaN.
#include "common/common.cuh"
#include "common/async.cuh"
#include "common/mma.cuh"

// Must match ops::attention::KernelParams field for field: the two tensor maps, then the 8-byte fields, then
// the 4-byte ones; both sides check the size and alignment (NVRTC has no offsetof; the Rust side also
// checks the offsets of the groups' first fields).
struct DecodeParams {
    // Decode only (zeros for prefill and the combine): the K and V caches as 5-d bf16 tensor maps (see
    // flash_decode_mma_kernel).
    TensorMap k_map;
    TensorMap v_map;
    const bf16_t* q;
    i64 q_stride_batch, q_stride_token, q_stride_head;
    const bf16_t* k;
    i64 k_stride_seq, k_stride_token, k_stride_head;  // k_stride_seq is the page stride when paged
    const bf16_t* v;
    i64 v_stride_seq, v_stride_token, v_stride_head;
    const int* seq_lens;
    const int* page_table;  // NULL: contiguous cache
    i64 page_table_stride;
    bf16_t* out;
    i64 out_stride_batch, out_stride_token, out_stride_head;
    float* lse;       // optional, dense [B, Tq, Hq]
    float* part_o;    // NULL when num_splits == 1: [B * Tq * Hq][num_splits][D] normalised partial outputs
    float* part_lse;  // [B * Tq * Hq][num_splits]
    int batch, tq, hq, hkv, group, rows_total, row_chunks;
    int max_len;  // lengths are clamped to [0, max_len]
    int window;   // <= 0: none
    int causal;
    int num_splits, chunk_keys;
    int page_shift, num_pages;
    float scale, softcap;  // softcap <= 0: none
    int flags;             // DECODE_STREAM_PARTIALS | DECODE_Q_FIRST | DECODE_SKEW_HINT
};
static_assert(sizeof(DecodeParams) == 512 && alignof(DecodeParams) == 64,
              "DecodeParams: size or alignment differs from ops::attention::KernelParams");

// DecodeParams::flags. With splits, each stream of a CTA writes its own partial output and lse, as split
// split * STREAMS + stream of num_splits = STREAMS * gridDim.y, and the combine merges the streams with the
// splits; without it a CTA's streams are merged through shared memory first and write split `split`.
constexpr int DECODE_STREAM_PARTIALS = 1;
// q's copies are issued right after the PDL wait, before the first tiles' (so that they do not queue behind
// the tiles' bytes); without it, after them.
constexpr int DECODE_Q_FIRST = 2;
// Tests only (ops::attention::skew_length_hint): the window's length hint is made wrong (hint / 2 + split),
// so that the tests reach the path that issues the first tiles again.
constexpr int DECODE_SKEW_HINT = 4;
// Before the PDL wait the CTA asks L2 for the lines of the tiles it copies right after it (its streams' first
// AHEAD tiles, prefetch_first_tiles): set where the grid is at most one CTA per SM, all resident from the start.
constexpr int DECODE_PREFETCH = 8;

SPK_DEVICE float neg_inf() { return __int_as_float(0xff800000); }

SPK_DEVICE float softcap_logit(float x, float cap) { return cap > 0.0f ? cap * tanhf(x / cap) : x; }

// Element offset of key j's row, or -1 when its page id lies outside [0, num_pages): the caller's error,
// whose keys then read as zeros (as decode's tensor-map copies read them), never memory outside the cache.
SPK_DEVICE i64 cache_offset(const DecodeParams& p, int b, int j, int head, i64 s_seq, i64 s_tok, i64 s_head) {
    if (p.page_table == nullptr) return (i64)b * s_seq + (i64)j * s_tok + (i64)head * s_head;
    const int page = p.page_table[(i64)b * p.page_table_stride + (j >> p.page_shift)];
    if (page < 0 || page >= p.num_pages) return -1;
    return (i64)page * s_seq + (i64)(j & ((1 << p.page_shift) - 1)) * s_tok + (i64)head * s_head;
}

// Row rg of a (sequence, KV head), rg = token * group + head_in_group: its new token t and query head hq.
SPK_DEVICE void row_token_head(int rg, int group, int hkv, int& t, int& hq) {
    t = rg / group;
    hq = hkv * group + rg - t * group;
}

// Zero partial outputs of rows [row0, row0 + rows) of one (sequence, KV head) for split `split`, by all
// threads of the block.
SPK_DEVICE void zero_partials(const DecodeParams& p, int b, int hkv, int row0, int rows, int split, int d) {
    const int vecs = d / 4;
    for (int i = threadIdx.x; i < rows * vecs; i += blockDim.x) {
        int t, hq;
        row_token_head(row0 + i / vecs, p.group, hkv, t, hq);
        const i64 row = ((i64)b * p.tq + t) * p.hq + hq;
        *reinterpret_cast<float4*>(p.part_o + (row * p.num_splits + split) * d + (i % vecs) * 4) =
            make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
}

// Before the PDL wait: asks L2 for every 128-byte line of K and V of the first `tiles` tiles of N keys from
// key `begin` (keys below `limit` only), by all threads of the block, so that the DRAM reads of the first
// tiles overlap the end of the kernel before, whose CTAs still run. Nothing is read into the SM: a line
// fetched early is never stale, since L2 is where that kernel's writes land. A page id (cache_offset) is read
// the same way, as a hint: a stale one only fetches a line that is not used, and one outside [0, num_pages)
// nothing. At most MAX_LINES lines per thread (the rest are left to the tiles' own copies), each thread's
// offsets found before any line is asked for.
template <int D, int N, int THREADS>
SPK_DEVICE void prefetch_first_tiles(const DecodeParams& p, int b, int hkv, int begin, int limit, int tiles) {
    constexpr int ROW_LINES = D * 2 / 128;  // 128-byte lines of one key's row
    constexpr int MAX_LINES = 4;
    const int lines = min(tiles * N * ROW_LINES, THREADS * MAX_LINES);
    i64 k_off[MAX_LINES], v_off[MAX_LINES];
#pragma unroll
    for (int u = 0; u < MAX_LINES; ++u) {
        const int e = threadIdx.x + u * THREADS;
        const int j = begin + e / ROW_LINES, line = e % ROW_LINES;
        const bool ok = e < lines && j < limit;
        k_off[u] = ok ? cache_offset(p, b, j, hkv, p.k_stride_seq, p.k_stride_token, p.k_stride_head) : -1;
        v_off[u] = ok ? cache_offset(p, b, j, hkv, p.v_stride_seq, p.v_stride_token, p.v_stride_head) : -1;
        if (k_off[u] >= 0) k_off[u] += line * 64;
        if (v_off[u] >= 0) v_off[u] += line * 64;
    }
#pragma unroll
    for (int u = 0; u < MAX_LINES; ++u) {
        if (k_off[u] >= 0) asm volatile("prefetch.global.L2 [%0];" ::"l"(p.k + k_off[u]));
        if (v_off[u] >= 0) asm volatile("prefetch.global.L2 [%0];" ::"l"(p.v + v_off[u]));
    }
}

// Flash decode on tensor cores.
//
// One CTA handles one (sequence, KV head, chunk of 16 rows) = blockIdx.x and one split = blockIdx.y (rows
// = token * group + head_in_group); its STREAMS streams of SLICES warps each work independently on
// different keys: stream s takes the 16-key tiles s, s + STREAMS, ... of the split into its own
// STAGES-deep ring, and keeps its own online-softmax state and output accumulator in registers. With
// SLICES > 1 (D = 512, whose full accumulator would not fit in registers) every warp of a stream computes
// the same scores of the tile (the same instructions on the same data, so bitwise the same m and l) and
// P V for its D / SLICES output dims.
//
// The kernel is bound by instruction issue unless the per-tile work is small (a few warps per SM stream
// the whole cache), so a tile costs few instructions: its 16 K rows and its 16 V rows arrive by one
// tensor-map copy each (cp.async.bulk.tensor, issued by one thread, completing on the stage's mbarrier:
// two TMA requests per tile, where one per row left the TMA unit's request rate as the limit; evict-first in
// L2, so that the cache streamed once does not push out the partial outputs the combine reads); whole tiles
// inside every row's visible range skip the per-element mask; the accumulator is rescaled only when a
// row's running max moved; exponentials are ex2.approx on log2-scaled scores.
// Per tile, as in prefill: S = Q K^T (the rows padded to M = 16, Q from shared memory by ldmatrix) and
// O += P V run as mma.sync m16n8k16 (bf16 in, fp32 accumulators), P re-packed as bf16 A fragments.
//
// At short contexts a CTA's fixed cost dominates (its 2 or 4 warps leave each instruction's latency
// exposed), so the prologue and epilogue are short. Without a window a split's key range does not depend
// on the sequence length: its first tiles are issued right after the PDL wait, while the length is read
// (one that turns out to lie past the sequence is only waited for); with a window they are issued from
// the length read before the wait as a hint (see the kernel). Where the grid is one CTA per SM or fewer
// (DECODE_PREFETCH), the lines of those first tiles are asked of L2 before the wait, while the kernel before
// ends and DRAM is otherwise idle (prefetch_first_tiles). At the end each lane writes its fragment
// rows g and g + 8 from registers: the output, or with splits the fp32 partials and lse for the combine.
// With one stream (D = 512) each warp writes its D / SLICES dims. With several and splits, each stream may
// write its own partial (DECODE_STREAM_PARTIALS, which ops::attention sets where a CTA holds at most 8
// rows) and the combine merges them with the splits'. With several and one partial per CTA, warp w owns
// dims [w D / STREAMS, (w + 1) D / STREAMS): it receives the other streams' m, l and O of those dims
// through shared memory (reusing the rings) and merges them with its own by log-sum-exp.
//
// The tensor maps (encoded on the host per launch, ops::attention) view a cache as 5-d, innermost first:
// (64 elements = 128 bytes of a head row, token, 64-element chunk of the row, KV head, sequence) for a
// contiguous cache, (..., page_size tokens, ..., page) for a paged one, with the caller's strides. The box
// (64, 16, D / 64, 1, 1) at (0, first key of the tile, 0, KV head, sequence or page) is one tile, and lands
// in shared memory as [D / 64][16 keys][128 bytes] with the 128-byte swizzle (tile_offset). Keys past the
// tensor's extent (max_len, or a page id outside [0, num_pages)) land as zeros. Every tile starts at a
// multiple of 16 keys (the sequence's first visible key is rounded down to one), so that with pages of 16
// tokens or more a tile never straddles two pages.
//
// The long variant (LONG, D = 256 only; ops::attention takes it for one sequence with per-stream partials, no
// window and many tiles per stream) gives each of the two streams two warps, each owning half the output
// dims (half the P V MMAs per warp, four warps issuing), and refills a ring stage as soon as its tile is
// consumed: S tiles in flight per stream instead of S - 1, at the cost of one more stream barrier per tile.
// Its CTAs hold at most 8 rows (one partial per stream needs that), so q's A fragments of rows g are kept in
// registers (rows g + 8 are zero, and their softmax is skipped), which leaves the shared memory of q to a
// third ring stage.
template <int D, bool LONG = false> struct DecodeMma {
    static_assert(!LONG || D == 256, "the long variant is built for D = 256");
    static constexpr int WARPS = LONG ? 4 : D >= 256 ? 2 : 4;
    // Warps per stream, each owning D / SLICES output dims.
    static constexpr int SLICES = LONG || D >= 512 ? 2 : 1;
    static constexpr int STREAMS = WARPS / SLICES;
    static constexpr int DO = D / SLICES;
    static constexpr int STAGES = LONG || D <= 64 ? 3 : 2;
    // Rows of q in shared memory (none used by LONG, which keeps q in registers).
    static constexpr int Q_ROWS = LONG ? 1 : 16;
    // Tiles in flight per stream: a stage is refilled once consumed (LONG) or once the next tile is waited for.
    static constexpr int AHEAD = LONG ? STAGES : STAGES - 1;
    static constexpr int THREADS = WARPS * 32;
    static constexpr int N = 16;         // keys per warp tile
    static constexpr int PITCH = D + 8;  // q rows padded by 16 bytes: conflict-free ldmatrix
    static constexpr int VECS = D / 8;
    static constexpr int TILE_BYTES = N * D * 2;  // one K or V tile, the tensor maps' box
};

// Alignment of the rings in shared memory: the 128-byte swizzle pattern repeats every 1024 bytes and
// follows the address bits, so a tile must start at a multiple of it to be laid out as tile_offset says.
// The dynamic shared memory is only 16-byte aligned; the kernel aligns its base, which costs up to this
// many bytes on top of sizeof(DecodeMmaShared) (ops::attention::decode_mma_shared_bytes counts them).
constexpr int SWIZZLE_ALIGN = 1024;

// Shared memory of one CTA; ops::attention::decode_mma_shared_bytes (decode_long_shared_bytes for LONG)
// computes the same size. The rings come first, at the SWIZZLE_ALIGN-aligned base; every tile's size is a
// multiple of 2048 bytes, so every tile is aligned too.
template <int D, bool LONG = false> struct DecodeMmaShared {
    using T = DecodeMma<D, LONG>;
    struct Ring {
        bf16_t k[T::N * D];  // [D / 64][N][64], swizzled: see tile_offset
        bf16_t v[T::N * D];
    };
    struct Merge {
        float o[T::STREAMS][16][D];
        float m[T::STREAMS][16];
        float l[T::STREAMS][16];
    };
    union {
        Ring ring[T::STREAMS][T::STAGES];
        Merge merge;  // after every warp has finished its tiles; o's columns swizzled (see the kernel's end)
    } u;
    bf16_t q[T::Q_ROWS][T::PITCH];
    unsigned long long bar[T::STREAMS][T::STAGES];  // one mbarrier per ring stage
};

// Byte offset, in a K or V tile as a tensor-map box lands with the 128-byte swizzle, of the 16-byte unit
// `unit` (elements 8 unit .. 8 unit + 7) of key `key`: the unit's 128-byte line is (chunk unit / 8, key),
// i.e. line 16 (unit / 8) + key, and within each 1024-byte group of 8 lines the unit's place in its line
// is XORed with the line's index in the group (key mod 8, as every chunk starts at a multiple of 8 lines).
// The 8 keys an ldmatrix matrix reads at one column so fall in 8 different 16-byte bank groups.
SPK_DEVICE unsigned tile_offset(int key, int unit) {
    return (unsigned)((unit >> 3) * (16 * 128) + key * 128 + (((unit ^ key) & 7) << 4));
}

// The shared-window address of unit u + step of the key whose unit u is at `lane_address` = tile +
// tile_offset(key, u), for u mod 8 < 2, an even step and a SWIZZLE_ALIGN-aligned tile: u + step stays in
// u's chunk up to step mod 8, whose place in the line is u's XOR step mod 8 (address bits 4-6, which the
// tile and the key's line leave clear), and step / 8 chunks are 16 lines each. One logic operation on a
// register that stays the same for the tile, the rest an immediate when step is a constant.
SPK_DEVICE unsigned swizzled_step(unsigned lane_address, int step) {
    return (lane_address ^ ((unsigned)(step & 7) << 4)) + (unsigned)(step >> 3) * (16 * 128);
}

// 2^x, ex2.approx (relative error about 2^-22; ex2(-inf) = 0).
SPK_DEVICE float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

// One online-softmax step of both kernels for the rows g + 8 h of an m16 fragment whose scores sc (NT n8
// tiles) are in log2 units, masked keys at -inf, and whose max over this lane's columns is mx: the quad's
// max becomes the row's running max m_row (`moved` is set when it grew), sc becomes 2^(sc - m_row) and this
// lane's share of the running sum l_row is updated. Returns the factor 2^(old max - new max) for the row's
// output accumulator, exactly 1 when the max did not move.
template <int NT>
SPK_DEVICE float softmax_rows_step(float (&sc)[NT][4], int h, float mx, float& m_row, float& l_row, bool& moved) {
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m_row, mx);
    moved |= m_new != m_row;
    // While a row has seen no visible key its max is -inf; subtracting 0 keeps 2^-inf = 0.
    const float m_use = m_new == neg_inf() ? 0.0f : m_new;
    const float alpha = fast_exp2(m_row - m_use);
    float sum = 0.0f;
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const float pe = fast_exp2(sc[n][2 * h + e] - m_use);
            sc[n][2 * h + e] = pe;
            sum += pe;
        }
    // Each lane keeps the sum of its own columns; the quad's sums are added at the end.
    l_row = l_row * alpha + sum;
    m_row = m_new;
    return alpha;
}

// The output accumulator's rows g and g + 8 times alpha[0] and alpha[1], when some row of the warp moved its
// max (alpha is exactly 1 for the others).
template <int DT> SPK_DEVICE void rescale_rows(float (&o)[DT][4], const float (&alpha)[2], bool moved) {
    if (!__any_sync(0xffffffffu, moved)) return;
#pragma unroll
    for (int d = 0; d < DT; ++d) {
        o[d][0] *= alpha[0];
        o[d][1] *= alpha[0];
        o[d][2] *= alpha[1];
        o[d][3] *= alpha[1];
    }
}

// This lane's part of output row (token t, query head hq) of flash_decode_mma_kernel: dims dim + 8 j and
// dim + 8 j + 1 (j < TILES; the 4 lanes of a quad cover 8 consecutive dims for each j), as bf16 into out or,
// with splits, as fp32 into the split's partial output; and the row's lse when `lse_lane`.
template <int D, int TILES>
SPK_DEVICE void decode_store_row(const DecodeParams& p, int b, int t, int hq, int split, int dim,
                                 const float (&v)[TILES][2], float lse, bool lse_lane) {
    const i64 row = ((i64)b * p.tq + t) * p.hq + hq;
    if (p.part_o == nullptr) {
        bf16_t* dst =
            p.out + (i64)b * p.out_stride_batch + (i64)t * p.out_stride_token + (i64)hq * p.out_stride_head + dim;
#pragma unroll
        for (int j = 0; j < TILES; ++j) *reinterpret_cast<unsigned*>(dst + 8 * j) = pack_bf16x2(v[j][0], v[j][1]);
        if (lse_lane && p.lse != nullptr) p.lse[row] = lse;
    } else {
        // Evict-last in L2: the partials stay there for the combine while the next call's cache streams through
        // (plain stores measured about 1 us slower at every ctx 32768 shape on the H100, docs/PERF.md).
        const unsigned long long policy = l2_evict_last_policy();
        float* dst = p.part_o + (row * p.num_splits + split) * D + dim;
#pragma unroll
        for (int j = 0; j < TILES; ++j) store_f32x2(dst + 8 * j, v[j][0], v[j][1], policy);
        if (lse_lane) store_f32(p.part_lse + row * p.num_splits + split, lse, policy);
    }
}

template <int D, bool LONG = false>
__global__ void __launch_bounds__(DecodeMma<D, LONG>::THREADS, 1)
    flash_decode_mma_kernel(const __grid_constant__ DecodeParams p) {
    using T = DecodeMma<D, LONG>;
    using Shared = DecodeMmaShared<D, LONG>;
    static_assert(T::N == 16 && D % 64 == 0, "tile_offset: 16-key tiles of 64-element chunks");
    static_assert(sizeof(typename Shared::Ring) % SWIZZLE_ALIGN == 0 && T::TILE_BYTES % SWIZZLE_ALIGN == 0,
                  "every tile keeps the rings' alignment");
    extern __shared__ uint4 shared_raw[];
    const unsigned pad = (0u - shared_address(shared_raw)) & (SWIZZLE_ALIGN - 1);
    if (dynamic_shared_bytes() < sizeof(Shared) + pad) __trap();
    Shared& s = *reinterpret_cast<Shared*>(reinterpret_cast<char*>(shared_raw) + pad);
    constexpr int VECS = T::VECS;
    constexpr int DT = T::DO / 8;  // n8 tiles of this warp's O slice
    constexpr int S = T::STAGES;
    constexpr int SL = T::SLICES;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int stream = warp / SL, slice = warp % SL;
    const int stream_lane = slice * 32 + lane;  // this thread among the stream's SL * 32
    // The stream's warps only: frees a stage / publishes a tile (named barrier 1 + stream; 0 is __syncthreads).
    auto stream_sync = [&]() {
        if constexpr (SL == 1) {
            __syncwarp();
        } else {
            asm volatile("bar.sync %0, %1;" ::"r"(stream + 1), "r"(SL * 32) : "memory");
        }
    };
    const int g = lane >> 2, c = lane & 3;
    const int split = blockIdx.y;
    int unit = blockIdx.x;
    const int row_chunk = unit % p.row_chunks;
    unit /= p.row_chunks;
    const int hkv = unit % p.hkv;
    const int b = unit / p.hkv;
    // This CTA's rows: [row0, row0 + rows) of the rows_total = group * tq of its (sequence, KV head).
    const int row0 = row_chunk * 16;
    const int rows = min(16, p.rows_total - row0);
    // LONG keeps q of rows g only (see DecodeMma); ops::attention takes it for at most 8 rows.
    if (LONG && rows > 8) __trap();

    // The thread that issues a stream's copies initialises its barriers (the stream's other threads wait on
    // them after the __syncthreads that publishes q).
    if (stream_lane == 0) {
#pragma unroll
        for (int st = 0; st < S; ++st) mbar_init(&s.bar[stream][st], 1);
        fence_proxy_async_shared();
    }
    // With splits the next kernel is the combine: its blocks may be scheduled at once, so that they sit
    // resident in their own wait (for this grid's completion) while this grid streams, and their launch is
    // off the chain. Without splits the next kernel is the caller's: it is let in once the tiles are done
    // (below), so that its blocks do not take this grid's SM slots early.
    if (p.part_o != nullptr) pdl_launch_dependents();
    // The maps are kernel parameters, not data of the kernel before this one: fetched before the wait.
    if (tid == 0) {
        prefetch_tensor_map(&p.k_map);
        prefetch_tensor_map(&p.v_map);
    }
    // Shared-window address of the stream's ring: stage st holds K at + st * sizeof(Ring), V TILE_BYTES on.
    const unsigned ring_base = shared_address(&s.u.ring[stream][0]);
    // The tile of keys [start, start + N) into stage `stage` of the stream's ring, by one thread: K and V,
    // one box each. Keys past the split's end are copied too (and masked; their V rows are zeroed after the
    // wait).
    auto issue_tile = [&](int start, int stage) {
        if (stream_lane != 0) return;
        unsigned long long* bar = &s.bar[stream][stage];
        int token = start, slot = b;
        if (p.page_table != nullptr) {
            slot = p.page_table[(i64)b * p.page_table_stride + (start >> p.page_shift)];
            token = start & ((1 << p.page_shift) - 1);
        }
        // Orders this stage's earlier generic reads (ldmatrix) and writes before the async-proxy copies.
        fence_proxy_async_shared();
        // Whole boxes count, out-of-bounds bytes included.
        mbar_arrive_expect_tx(bar, 2 * T::TILE_BYTES);
        const unsigned dst = ring_base + stage * (unsigned)sizeof(typename Shared::Ring);
        const unsigned long long policy = l2_evict_first_policy();
        tensor_copy_5d_g2s(dst, &p.k_map, 0, token, 0, hkv, slot, bar, policy);
        tensor_copy_5d_g2s(dst + T::TILE_BYTES, &p.v_map, 0, token, 0, hkv, slot, bar, policy);
    };
    // q of the rows, bf16: this thread copies row tid % 16 (one division), vectors tid / 16 + k THREADS / 16;
    // rows past rows_total are zero (their source, row0's, only needs to be a valid address).
    static_assert(VECS % (T::THREADS / 16) == 0, "q: whole passes of THREADS / 16 vectors per row");
    const int q_r = tid & 15;
    const bool q_valid = q_r < rows;
    const bf16_t* q_src;
    {
        int t, hq;
        row_token_head(row0 + (q_valid ? q_r : 0), p.group, hkv, t, hq);
        q_src = p.q + (i64)b * p.q_stride_batch + (i64)t * p.q_stride_token + (i64)hq * p.q_stride_head;
    }

    // With a window the first tiles start at a key that depends on the sequence length. Its value before
    // the PDL wait is read as a hint (the kernel before may still be writing it): the first tiles are
    // issued from the hint right after the wait, and issued again should the length read after the wait
    // place them elsewhere.
    int hint = 0;
    if (p.window > 0) hint = *reinterpret_cast<const volatile int*>(p.seq_lens + b);
    if (p.flags & DECODE_SKEW_HINT) hint = hint / 2 + split;
    // The stream's first AHEAD tiles are issued while the length is read (after the wait): [0, issued), those
    // that start in the split as far as it is known by then. Without a window the split's keys start at
    // split * chunk_keys whatever the length, below max_len; with one they start where the hint places them,
    // below the hint. Those at or past my_tiles, known once the length is, lie past the sequence: they are
    // only waited for, so that no copy into the rings is outstanding when the CTA exits or the rings become
    // Merge.
    // A length clamped to [0, max_len], and the first key any row of a sequence of that length sees.
    auto clamp_len = [&](int l) { return min(max(l, 0), p.max_len); };
    auto first_key = [&](int l) { return p.window > 0 ? max(0, l - p.tq + 1 - p.window) : 0; };
    int early_begin = split * p.chunk_keys;
    int early_limit = min(early_begin + p.chunk_keys, p.max_len);
    if (p.window > 0) {
        const int hint_len = clamp_len(hint);
        early_begin += first_key(hint_len) & ~(T::N - 1);
        early_limit = min(early_begin + p.chunk_keys, hint_len);
    }
    // The first tiles as far as they are known, asked of L2 while the kernel before ends (DECODE_PREFETCH).
    if (p.flags & DECODE_PREFETCH)
        prefetch_first_tiles<D, T::N, T::THREADS>(p, b, hkv, early_begin, early_limit, T::AHEAD * T::STREAMS);
    // Launched with programmatic dependent launch: nothing else is read before this wait.
    pdl_wait();
    const int seq_len = p.seq_lens[b];
    // LONG: this lane's A fragments of q (row g, dims 16 kk + 2c, + 1 and 16 kk + 8 + 2c, + 1), zero past the
    // CTA's rows.
    unsigned q_frag[LONG ? D / 16 : 1][2];
    auto copy_q = [&]() {
        if constexpr (LONG) {
            int t, hq;
            row_token_head(row0 + (g < rows ? g : 0), p.group, hkv, t, hq);
            const bf16_t* src =
                p.q + (i64)b * p.q_stride_batch + (i64)t * p.q_stride_token + (i64)hq * p.q_stride_head + 2 * c;
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
                for (int h = 0; h < 2; ++h)
                    q_frag[kk][h] = g < rows ? *reinterpret_cast<const unsigned*>(src + kk * 16 + 8 * h) : 0u;
        } else {
#pragma unroll
            for (int k = 0; k < VECS / (T::THREADS / 16); ++k) {
                const int vec = (tid >> 4) + k * (T::THREADS / 16);
                cp_async_16(&s.q[q_r][vec * 8], q_src + vec * 8, q_valid);
            }
            cp_async_commit();
        }
    };
    if (p.flags & DECODE_Q_FIRST) copy_q();
    int issued = 0;
#pragma unroll
    for (int i = 0; i < T::AHEAD; ++i) {
        const int start = early_begin + (stream + i * T::STREAMS) * T::N;
        if (start < early_limit) {
            issue_tile(start, i);
            issued = i + 1;
        }
    }
    if (!(p.flags & DECODE_Q_FIRST)) copy_q();

    const int len = clamp_len(seq_len);
    // The first key any row sees, and the start of the sequence's tiles: that key rounded down to a
    // multiple of N, so that a tile lies in one page. The keys before `first` in the first tile are masked
    // like any invisible key (and their V rows zeroed: they may hold anything). ops::attention sizes the
    // splits for the up to N - 1 extra keys.
    const int first = first_key(len);
    const int lo = first & ~(T::N - 1);
    const int begin = lo + split * p.chunk_keys;
    const int end = min(begin + p.chunk_keys, len);
    // Partials per CTA: one per stream (DECODE_STREAM_PARTIALS) or one.
    const int parts = (p.flags & DECODE_STREAM_PARTIALS) ? T::STREAMS : 1;

    if (begin >= end) {
        cp_async_wait<0>();
        // Nothing visible here: an empty split reports lse = -inf and a zero partial output (the combine
        // reads every split and gives this one weight 0); without splits the rows are final: zeros and
        // lse = -inf.
        if (p.part_o != nullptr)
            for (int u = 0; u < parts; ++u) zero_partials(p, b, hkv, row0, rows, split * parts + u, D);
        for (int r = row0 + tid; r < row0 + rows; r += T::THREADS) {
            int t, hq;
            row_token_head(r, p.group, hkv, t, hq);
            const i64 row = ((i64)b * p.tq + t) * p.hq + hq;
            if (p.part_o != nullptr) {
                for (int u = 0; u < parts; ++u) p.part_lse[row * p.num_splits + split * parts + u] = neg_inf();
            } else if (p.lse != nullptr) {
                p.lse[row] = neg_inf();
            }
        }
        if (p.part_o == nullptr) {
            for (int i = tid; i < rows * VECS; i += T::THREADS) {
                const int vec = i % VECS;
                int t, hq;
                row_token_head(row0 + i / VECS, p.group, hkv, t, hq);
                store_u128(p.out + (i64)b * p.out_stride_batch + (i64)t * p.out_stride_token +
                               (i64)hq * p.out_stride_head + vec * 8,
                           make_uint4(0, 0, 0, 0));
            }
        }
        if (stream_lane == 0)
            for (int i = 0; i < issued; ++i) mbar_wait(&s.bar[stream][i], 0u);
        return;
    }

    const int num_tiles = (end - begin + T::N - 1) / T::N;
    const int my_tiles = num_tiles > stream ? (num_tiles - stream + T::STREAMS - 1) / T::STREAMS : 0;
    // First key of the stream's i-th tile.
    auto tile_start = [&](int i) { return begin + (stream + i * T::STREAMS) * T::N; };
    // With a window the first tiles depend on the length: those the hint placed at the split's real first
    // key stand (the ones past the stream's last, if any, are only waited for below); otherwise they are
    // waited for, their stages' barriers then count one completed phase more (`flip`, one bit per stage),
    // and the tiles are issued again. Without a window every tile below my_tiles was issued above.
    unsigned flip = 0;
    if (p.window > 0) {
        if (early_begin != begin) {
            if (stream_lane == 0)
                for (int i = 0; i < issued; ++i) mbar_wait(&s.bar[stream][i], 0u);
            flip = (1u << issued) - 1u;
            issued = 0;
        }
#pragma unroll
        for (int i = 0; i < T::AHEAD; ++i) {
            // tile_start(i) < end is i < my_tiles.
            if (i >= issued && tile_start(i) < end) issue_tile(tile_start(i), i);
        }
    }
    cp_async_wait<0>();
    __syncthreads();  // every thread's q copies and the barriers' initialisation visible

    float o[DT][4];
#pragma unroll
    for (int i = 0; i < DT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[i][e] = 0.0f;
    // Running max (log2 units) and this lane's share of the running sum of the rows g and g + 8.
    float m_row[2] = {neg_inf(), neg_inf()};
    float l_row[2] = {0.0f, 0.0f};
    int pos_row[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) pos_row[h] = len - p.tq + (row0 + g + 8 * h) / p.group;
    const float scale_log2 = p.scale * LOG2E;
    // Keys every row may see: [begin, end) clipped by causality (first row's position) and the window (last
    // row's position). A tile inside it needs no per-element mask.
    const int full_hi = p.causal ? min(end, len - p.tq + 1) : end;
    const int full_lo = p.window > 0 ? max(begin, len - p.window) : begin;

    // The rows this lane addresses for ldmatrix in a tile: for K (S = Q K^T, matrices (keys 0-7, units
    // 2 kk, 2 kk + 1), (keys 8-15, ...)) key (lane & 7) + 8 (lane >> 4) at unit (lane >> 3) & 1 + 2 kk; for V
    // (P V, transposed: (keys 0-7, unit 2 d2), (keys 8-15, 2 d2), (keys 0-7, 2 d2 + 1), ...) key
    // (lane & 7) + 8 ((lane >> 3) & 1) at unit slice DO / 8 + (lane >> 4) + 2 d2.
    const unsigned k_lane_offset = tile_offset((lane & 7) + (lane >> 4) * 8, (lane >> 3) & 1);
    const unsigned v_lane_offset = tile_offset((lane & 7) + ((lane >> 3) & 1) * 8, slice * (T::DO / 8) + (lane >> 4));

    // Tiles issued ahead that lie past the stream's last (none with one stream and S = 2: a split with keys
    // gives its only stream at least the one tile issued ahead).
    if constexpr (T::STREAMS > 1 || T::AHEAD > 1) {
        if (stream_lane == 0)
            for (int i = my_tiles; i < issued; ++i) mbar_wait(&s.bar[stream][i], 0u);
    }

    for (int i = 0; i < my_tiles; ++i) {
        const int stage = i % S;
        const int start = tile_start(i);
        typename Shared::Ring& ring = s.u.ring[stream][stage];
        // This lane's ldmatrix row of the tile's K and V at unit offset 0 (see swizzled_step).
        const unsigned k_lane = ring_base + stage * (unsigned)sizeof(typename Shared::Ring) + k_lane_offset;
        const unsigned v_lane = k_lane - k_lane_offset + T::TILE_BYTES + v_lane_offset;
        mbar_wait(&s.bar[stream][stage], ((unsigned)(i / S) ^ (flip >> stage)) & 1u);
        // Keys of the tile outside [first, end) (before the window in the sequence's first tile, past the
        // split's end in its last) are masked, but their V rows may hold anything, and 0 * NaN is NaN: they
        // are zeroed. A key's row is whole 128-byte lines of the tile (line 16 chunk + key; the swizzle only
        // moves units within a line).
        const int keep_lo = first - start, keep_hi = end - start;
        if (keep_lo > 0 || keep_hi < T::N) {
            char* v = reinterpret_cast<char*>(ring.v);
            for (int e = stream_lane; e < T::TILE_BYTES / 16; e += SL * 32) {
                const int key = (e >> 3) & (T::N - 1);
                if (key < keep_lo || key >= keep_hi) store_u128(v + e * 16, make_uint4(0, 0, 0, 0));
            }
            // Orders these generic writes before the async-proxy copy that will refill the stage.
            fence_proxy_async_shared();
        }
        if constexpr (LONG) {
            // Publishes the zeroed rows; the stage is refilled below, once both warps have consumed it.
            if (keep_lo > 0 || keep_hi < T::N) stream_sync();
        } else {
            // Publishes the zeroed rows and (every thread having finished tile i - 1) frees that tile's stage.
            stream_sync();
            if (i + S - 1 < my_tiles) issue_tile(tile_start(i + S - 1), (i + S - 1) % S);
        }

        // S = Q K^T for the 16 rows and the tile's 16 keys; up to D = 256 the even and odd k steps go into
        // separate accumulators (two chains of D / 32 dependent MMAs per key half instead of one of D / 16),
        // then added. At D = 512 the 8 more registers spill on sm_120.
        constexpr bool QK_PAIRS = D <= 256;
        float sc[2][4], sc_odd[2][4];
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) sc[n][e] = sc_odd[n][e] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            unsigned a[4], bk[4];
            if constexpr (LONG) {
                a[0] = q_frag[kk][0];
                a[1] = 0u;
                a[2] = q_frag[kk][1];
                a[3] = 0u;
            } else {
                ldmatrix_x4(a, &s.q[lane & 15][kk * 16 + (lane >> 4) * 8]);
            }
            ldmatrix_x4(bk, swizzled_step(k_lane, kk * 2));
            float (&acc)[2][4] = (QK_PAIRS && (kk & 1)) ? sc_odd : sc;
            mma_bf16_16816(acc[0], a, bk[0], bk[1]);
            mma_bf16_16816(acc[1], a, bk[2], bk[3]);
        }
        if constexpr (QK_PAIRS) {
#pragma unroll
            for (int n = 0; n < 2; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) sc[n][e] += sc_odd[n][e];
        }

        // Scale (log2 units), softcap, mask; online softmax per row (a row's 16 values sit in a quad's lanes).
        const bool full = start >= full_lo && start + T::N <= full_hi;
        bool moved = false;
        float alpha_row[2];
        // LONG: rows g + 8 lie past the CTA's rows; their scores are left unused.
        if constexpr (LONG) alpha_row[1] = 1.0f;
#pragma unroll
        for (int h = 0; h < (LONG ? 1 : 2); ++h) {
            const int r = g + 8 * h;
            const int pos = pos_row[h];
            float mx = neg_inf();
#pragma unroll
            for (int n = 0; n < 2; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float x = sc[n][2 * h + e];
                    x = p.softcap > 0.0f ? softcap_logit(x * p.scale, p.softcap) * LOG2E : x * scale_log2;
                    if (!full) {
                        const int j = start + n * 8 + 2 * c + e;
                        const bool visible = r < rows && j < end && (!p.causal || j <= pos) &&
                                             (p.window <= 0 || j > pos - p.window);
                        x = visible ? x : neg_inf();
                    }
                    sc[n][2 * h + e] = x;
                    mx = fmaxf(mx, x);
                }
            alpha_row[h] = softmax_rows_step(sc, h, mx, m_row[h], l_row[h], moved);
        }
        rescale_rows(o, alpha_row, moved);

        // O += P V for this warp's output dims [slice * DO, (slice + 1) * DO), P as bf16 A fragments
        // straight from the S accumulators.
        unsigned a[4];
        a[0] = pack_bf16x2(sc[0][0], sc[0][1]);
        a[1] = LONG ? 0u : pack_bf16x2(sc[0][2], sc[0][3]);
        a[2] = pack_bf16x2(sc[1][0], sc[1][1]);
        a[3] = LONG ? 0u : pack_bf16x2(sc[1][2], sc[1][3]);
#pragma unroll
        for (int d2 = 0; d2 < DT / 2; ++d2) {
            unsigned bv[4];
            ldmatrix_x4_trans(bv, swizzled_step(v_lane, d2 * 2));
            mma_bf16_16816(o[2 * d2], a, bv[0], bv[1]);
            mma_bf16_16816(o[2 * d2 + 1], a, bv[2], bv[3]);
        }
        if constexpr (LONG) {
            // Both warps of the stream are done with the stage: it takes the stream's tile i + S.
            stream_sync();
            if (i + S < my_tiles) issue_tile(tile_start(i + S), stage);
        }
    }
    // Without splits the next kernel may now be scheduled; it waits for this grid to finish.
    pdl_launch_dependents();

    // The rows' sums: each lane of a quad kept its own columns' share.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        l_row[h] += __shfl_xor_sync(0xffffffffu, l_row[h], 1);
        l_row[h] += __shfl_xor_sync(0xffffffffu, l_row[h], 2);
    }
    // out = sum_w O_w 2^(m_w - M) / sum_w l_w 2^(m_w - M) over the streams w, M = max_w m_w (log2 units);
    // lse = ln(2) (M + log2 l). Each lane writes its fragment's rows g and g + 8 straight from registers.
    // The rows' token t and query head hq are derived from the block index again, through opaque copies of
    // the divisors: the compiler would otherwise keep the prologue's quotients live through the tile loop,
    // which at D = 512 takes every register. lane_row + 8 h is row g + 8 h of the (sequence, KV head).
    int group = p.group, row_chunks = p.row_chunks;
    asm volatile("" : "+r"(group), "+r"(row_chunks));
    const int lane_row = (int)(blockIdx.x % (unsigned)row_chunks) * 16 + g;
    // Rows straight from registers: with one stream (its SLICES warps hold the same m and l) each warp
    // writes its D / SLICES dims of the split's partial; with several and one partial per stream, each
    // stream writes its own whole rows (slice 0) and the combine merges the streams.
    if (T::STREAMS == 1 || parts > 1) {
        const int part = T::STREAMS == 1 ? split : split * T::STREAMS + stream;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = g + 8 * h;
            if (r >= rows) continue;
            const float l = l_row[h];
            const float inv = l > 0.0f ? 1.0f / l : 0.0f;
            const float row_lse = l > 0.0f ? (m_row[h] + __log2f(l)) * LN2 : neg_inf();
            float v[DT][2];
#pragma unroll
            for (int d = 0; d < DT; ++d) {
                v[d][0] = o[d][2 * h] * inv;
                v[d][1] = o[d][2 * h + 1] * inv;
            }
            int t, hq;
            row_token_head(lane_row + 8 * h, group, hkv, t, hq);
            decode_store_row<D, DT>(p, b, t, hq, part, slice * T::DO + 2 * c, v, row_lse, c == 0 && slice == 0);
        }
        return;
    }
    if constexpr (LONG) {
        // ops::attention takes the long variant only with one partial per stream.
        __trap();
    } else if constexpr (T::STREAMS > 1) {
        // Several streams, one warp each: warp w writes dims [w D / STREAMS, (w + 1) D / STREAMS), OWN n8
        // tiles of its accumulator; it passes the other streams their dims (and its m and l) through Merge.
        constexpr int OWN = DT / T::STREAMS;
        static_assert(SL == 1 && DT % T::STREAMS == 0, "a stream's output dims are whole n8 tiles");
        // Column of dim 8 d + 2c in a row of Merge.o: (d / 4) 32 + col[d % 4]. In every 32 floats the 8-float
        // group is XORed with the row mod 4 (g mod 4 for the rows g and g + 8), so that the float2 accesses of
        // a half warp (4 rows, 4 lanes each) fall in distinct banks.
        int col[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) col[k] = ((k ^ (g & 3)) << 3) + 2 * c;
        // Every tile was waited for; every warp must be done with its ring before it becomes Merge.
        __syncthreads();
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            if (c == 0) {
                s.u.merge.m[stream][g + 8 * h] = m_row[h];
                s.u.merge.l[stream][g + 8 * h] = l_row[h];
            }
        }
#pragma unroll
        for (int w = 0; w < T::STREAMS; ++w) {
            if (w != stream) continue;
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int d = 0; d < DT; ++d) {
                    if (d / OWN == w) continue;
                    *reinterpret_cast<float2*>(&s.u.merge.o[w][g + 8 * h][(d >> 2) * 32 + col[d & 3]]) =
                        make_float2(o[d][2 * h], o[d][2 * h + 1]);
                }
        }
        __syncthreads();
        // The same sums as a loop over all the streams in order, with this warp's own terms from registers.
#pragma unroll
        for (int w = 0; w < T::STREAMS; ++w) {
            if (w != stream) continue;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = g + 8 * h;
                float mw[T::STREAMS];
                float mx = neg_inf();
#pragma unroll
                for (int u = 0; u < T::STREAMS; ++u) {
                    mw[u] = u == w ? m_row[h] : s.u.merge.m[u][r];
                    mx = fmaxf(mx, mw[u]);
                }
                const float m_use = mx == neg_inf() ? 0.0f : mx;
                float wt[T::STREAMS];
                float l = 0.0f;
#pragma unroll
                for (int u = 0; u < T::STREAMS; ++u) {
                    wt[u] = fast_exp2(mw[u] - m_use);
                    l = fmaf(u == w ? l_row[h] : s.u.merge.l[u][r], wt[u], l);
                }
                const float inv = l > 0.0f ? 1.0f / l : 0.0f;
                const float row_lse = l > 0.0f ? (mx + __log2f(l)) * LN2 : neg_inf();
                float v[OWN][2];
#pragma unroll
                for (int j = 0; j < OWN; ++j) {
                    const int d = w * OWN + j;
                    float a0 = 0.0f, a1 = 0.0f;
#pragma unroll
                    for (int u = 0; u < T::STREAMS; ++u) {
                        const float2 x =
                            u == w ? make_float2(o[d][2 * h], o[d][2 * h + 1])
                                   : *reinterpret_cast<const float2*>(&s.u.merge.o[u][r][(d >> 2) * 32 + col[d & 3]]);
                        a0 = fmaf(x.x, wt[u], a0);
                        a1 = fmaf(x.y, wt[u], a1);
                    }
                    v[j][0] = a0 * inv;
                    v[j][1] = a1 * inv;
                }
                if (r < rows) {
                    int t, hq;
                    row_token_head(lane_row + 8 * h, group, hkv, t, hq);
                    decode_store_row<D, OWN>(p, b, t, hq, split, w * OWN * 8 + 2 * c, v, row_lse,
                                             c == 0 && w == 0);
                }
            }
        }
    }
}

// acc += w (a, b): one partial's 8 dims, weighted (both combines).
SPK_DEVICE void combine_fma8(float (&acc)[8], float w, const float4& a, const float4& b) {
    acc[0] = fmaf(w, a.x, acc[0]);
    acc[1] = fmaf(w, a.y, acc[1]);
    acc[2] = fmaf(w, a.z, acc[2]);
    acc[3] = fmaf(w, a.w, acc[3]);
    acc[4] = fmaf(w, b.x, acc[4]);
    acc[5] = fmaf(w, b.y, acc[5]);
    acc[6] = fmaf(w, b.z, acc[6]);
    acc[7] = fmaf(w, b.w, acc[7]);
}

// Output row `row` of both combines: its sequence b, token t and query head hq.
struct CombineRow {
    i64 row;
    int b, t, hq;
};

SPK_DEVICE CombineRow combine_row(const DecodeParams& p, i64 row) {
    const int hq = (int)(row % p.hq);
    const int t = (int)((row / p.hq) % p.tq);
    const int b = (int)(row / ((i64)p.hq * p.tq));
    return {row, b, t, hq};
}

// Dims [8 vec, 8 vec + 8) of output row r: the merged o as bf16, and with vec = 0 the row's lse, mx +
// ln(total) (-inf for a row of no weight).
SPK_DEVICE void combine_store(const DecodeParams& p, const CombineRow& r, int vec, const float (&o)[8], float mx,
                              float total) {
    store_u128(p.out + (i64)r.b * p.out_stride_batch + (i64)r.t * p.out_stride_token +
                   (i64)r.hq * p.out_stride_head + vec * 8,
               f32_to_bf16x8(o));
    if (p.lse != nullptr && vec == 0) p.lse[r.row] = total > 0.0f ? mx + logf(total) : neg_inf();
}

// Merges the splits of one output row: out = sum_s w_s o_s / sum_s w_s with w_s = exp(lse_s - max lse),
// over the num_splits partials (one per split, or per stream of each split: DECODE_STREAM_PARTIALS).
// Splits with lse = -inf (no visible key; the decode kernels write their partial output as zeros) get
// weight 0; a row with no split left gets zeros and lse = -inf. Block (row = blockIdx.x, chunk of
// COMBINE_LANES vectors of 8 dims = blockIdx.y). The chain is short: every load is issued at once (thread
// i's lse is split i's, and each thread's partial outputs are of every SLICES-th split for one vector);
// the block's max lse and the weights follow from two block reductions, so that the sum over the splits is
// a plain weighted sum (no rescaling between threads); then the slices are summed by warp shuffles and
// shared memory, in a fixed order.
// Launched with programmatic dependent launch after the decode kernel, which lets its blocks be scheduled
// from its start: nothing is read before pdl_wait(). Once the decode grid is done, it lets the next
// kernel's blocks be scheduled (that kernel waits for this grid's completion before it touches memory), so
// that their launch and prologue overlap the merge. Letting them in before its wait put the next decode
// grid's blocks on the SMs beside the running one, which measured up to 0.9 µs slower (docs/PERF.md).
constexpr int COMBINE_THREADS = 256;
constexpr int COMBINE_LANES = 4;
constexpr int COMBINE_MAX_SPLITS = 256;  // ops::attention::MAX_SPLITS

template <int D> __global__ void __launch_bounds__(COMBINE_THREADS) attention_combine_kernel(const DecodeParams p) {
    constexpr int LANES = COMBINE_LANES;
    constexpr int SLICES = COMBINE_THREADS / LANES;
    constexpr int WARPS = COMBINE_THREADS / 32;
    constexpr int BATCH = COMBINE_MAX_SPLITS / SLICES;
    static_assert(D / 8 % LANES == 0, "head dim chunks");
    static_assert(COMBINE_MAX_SPLITS == COMBINE_THREADS, "one split's lse per thread");
    __shared__ float weight[COMBINE_MAX_SPLITS];
    __shared__ float warp_max[WARPS], warp_sum[WARPS];
    __shared__ float part[WARPS][LANES][8];
    pdl_wait();
    pdl_launch_dependents();
    const i64 row = blockIdx.x;
    const CombineRow out_row = combine_row(p, row);
    const int splits = p.num_splits;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int lane_v = tid % LANES;
    const int slice = tid / LANES;
    const int vec = blockIdx.y * LANES + lane_v;

    const float my_lse = tid < splits ? p.part_lse[row * splits + tid] : neg_inf();
    float4 va[BATCH], vb[BATCH];
#pragma unroll
    for (int k = 0; k < BATCH; ++k) {
        const int s = slice + k * SLICES;
        va[k] = vb[k] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (s < splits) {
            const float* src = p.part_o + (row * splits + s) * D + vec * 8;
            va[k] = *reinterpret_cast<const float4*>(src);
            vb[k] = *reinterpret_cast<const float4*>(src + 4);
        }
    }
    // The row's max lse, then the weights (0 for an empty split, and for every split of an empty row).
    float mx = warp_reduce_max(my_lse);
    if (lane == 0) warp_max[warp] = mx;
    __syncthreads();
    mx = warp_max[0];
#pragma unroll
    for (int w = 1; w < WARPS; ++w) mx = fmaxf(mx, warp_max[w]);
    const float e = mx == neg_inf() ? 0.0f : expf(my_lse - mx);
    weight[tid] = e;
    const float e_sum = warp_reduce_sum(e);
    if (lane == 0) warp_sum[warp] = e_sum;
    __syncthreads();
    float acc[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[j] = 0.0f;
#pragma unroll
    for (int k = 0; k < BATCH; ++k) {
        const int s = slice + k * SLICES;
        if (s < splits) {
            const float w = weight[s];
            combine_fma8(acc, w, va[k], vb[k]);
        }
    }
    // The warp's slices (lanes with the same lane_v), then the warps'.
#pragma unroll
    for (int off = LANES; off < 32; off <<= 1)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[j] += __shfl_xor_sync(0xffffffffu, acc[j], off);
    if (lane < LANES)
#pragma unroll
        for (int j = 0; j < 8; ++j) part[warp][lane][j] = acc[j];
    __syncthreads();
    if (tid >= LANES) return;
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) total += warp_sum[w];
    const float inv = total > 0.0f ? 1.0f / total : 0.0f;
    float o[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) sum += part[w][lane_v][j];
        o[j] = sum * inv;
    }
    combine_store(p, out_row, vec, o, mx, total);
}

// The same merge for rows with few partials (ops::attention::COMBINE_ROWS_MAX_PARTS), as a batch leaves
// them: each thread takes 8 dims of one row and every partial of it in turn, COMBINE_ROWS_BATCH partials'
// loads at a time, with no barrier; a block takes COMBINE_ROWS_THREADS / (D / 8) rows. The block per row and
// chunk of dims above holds one split per thread, so with few partials most of its threads are idle and a
// batch of many rows takes several waves of short, latency-bound blocks (B = 64 sequences at 4K, 6 partials
// per row: 8192 blocks). The same weights, summed over the partials in order (the kernel above sums each
// thread's partials, then the threads'); the same PDL protocol.
constexpr int COMBINE_ROWS_THREADS = 64;
constexpr int COMBINE_ROWS_BATCH = 8;

template <int D>
__global__ void __launch_bounds__(COMBINE_ROWS_THREADS) attention_combine_rows_kernel(const DecodeParams p) {
    constexpr int VECS = D / 8;  // threads per row
    constexpr int BATCH = COMBINE_ROWS_BATCH;
    static_assert(COMBINE_ROWS_THREADS % VECS == 0, "whole rows per block");
    pdl_wait();
    pdl_launch_dependents();
    const i64 row = (i64)blockIdx.x * (COMBINE_ROWS_THREADS / VECS) + threadIdx.x / VECS;
    if (row >= (i64)p.batch * p.tq * p.hq) return;
    const int vec = threadIdx.x % VECS;
    const CombineRow out_row = combine_row(p, row);
    const int splits = p.num_splits;
    const float* lse = p.part_lse + row * splits;
    const float* src = p.part_o + row * splits * D + vec * 8;

    // The row's max lse: the threads of a row read the same values (one broadcast load per warp each).
    float mx = neg_inf();
    for (int s0 = 0; s0 < splits; s0 += BATCH) {
        float l[BATCH];
#pragma unroll
        for (int k = 0; k < BATCH; ++k) l[k] = s0 + k < splits ? lse[s0 + k] : neg_inf();
#pragma unroll
        for (int k = 0; k < BATCH; ++k) mx = fmaxf(mx, l[k]);
    }
    float acc[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[j] = 0.0f;
    float total = 0.0f;
    for (int s0 = 0; s0 < splits; s0 += BATCH) {
        float4 va[BATCH], vb[BATCH];
        float e[BATCH];
#pragma unroll
        for (int k = 0; k < BATCH; ++k) {
            const int s = s0 + k;
            va[k] = vb[k] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            e[k] = neg_inf();
            if (s < splits) {
                va[k] = *reinterpret_cast<const float4*>(src + (i64)s * D);
                vb[k] = *reinterpret_cast<const float4*>(src + (i64)s * D + 4);
                e[k] = lse[s];
            }
        }
        // Weight 0 for an empty split (lse = -inf) and for every split of an empty row (max -inf).
#pragma unroll
        for (int k = 0; k < BATCH; ++k) {
            const float w = mx == neg_inf() ? 0.0f : expf(e[k] - mx);
            total += w;
            combine_fma8(acc, w, va[k], vb[k]);
        }
    }
    const float inv = total > 0.0f ? 1.0f / total : 0.0f;
    float o[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) o[j] = acc[j] * inv;
    combine_store(p, out_row, vec, o, mx, total);
}

// Prefill: attention of a chunk of T query tokens (up to 8192) against the cache, on tensor cores.
//
// Same parameters and masking as flash decode (q_len = T; the chunk's tokens are the last T of the cache).
// One CTA of 4 warps takes M query rows of one query head; S = Q K^T and O += P V run as mma.sync m16n8k16
// (bf16 in, fp32 accumulators), with the online softmax on the accumulator fragments and P re-packed as
// bf16 A fragments in registers. Up to D = 256 each warp owns 16 rows (M = 64); at D = 512, whose 16 x 512
// fp32 output tile would not fit one warp's registers, a pair of warps shares 16 rows (M = 32): both
// compute the same scores (the same instructions on the same data, so bitwise the same softmax state) and
// each accumulates P V for half of the output dims, as the decode kernel does. Shared memory: Q [M][D] and
// one K and one V tile [32][D], rows padded by 16 bytes for conflict-free ldmatrix (at most 97.5 KiB, for
// D = 512).
//
// Key tiles of 32 keys are copied with cp.async, K and V apart, so that each copy overlaps the other half
// of the math: V of tile j lands while S = Q K^T of tile j runs, K of tile j + 1 while O += P V of tile j
// runs. Scores are kept in log2 units (ex2.approx); a tile that every row of a warp sees whole skips the
// per-element mask, and the accumulator is rescaled only when a row's running max moved. Under causal
// masking the rows late in the chunk see the most keys: their CTAs come first (row block gridDim.y - 1 -
// blockIdx.y, the query heads along x), so that the last wave holds the short ones.
constexpr int PREFILL_THREADS = 128;
constexpr int PREFILL_N = 32;

template <int D> struct PrefillTile {
    static constexpr int SLICES = D >= 512 ? 2 : 1;  // warps sharing 16 rows, each D / SLICES output dims
    static constexpr int M = 16 * (PREFILL_THREADS / 32) / SLICES;
    static constexpr int DO = D / SLICES;
};

template <int D> struct PrefillShared {
    static constexpr int PITCH = D + 8;
    bf16_t q[PrefillTile<D>::M][PITCH];
    bf16_t k[PREFILL_N][PITCH];
    bf16_t v[PREFILL_N][PITCH];
};

template <int D>
__global__ void __launch_bounds__(PREFILL_THREADS, 1) attention_prefill_kernel(const DecodeParams p) {
    using Shared = PrefillShared<D>;
    using T = PrefillTile<D>;
    extern __shared__ uint4 shared_raw[];
    if (dynamic_shared_bytes() < sizeof(Shared)) __trap();
    Shared& s = *reinterpret_cast<Shared*>(shared_raw);
    constexpr int VECS = D / 8;
    constexpr int NT = PREFILL_N / 8;  // n8 tiles of S
    constexpr int DT = T::DO / 8;      // n8 tiles of this warp's O slice
    constexpr int M = T::M;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int rows16 = warp / T::SLICES, slice = warp % T::SLICES;  // the warp's 16 rows, its output dims
    const int g = lane >> 2, c = lane & 3;
    const int m0 = (int)(gridDim.y - 1 - blockIdx.y) * M;
    const int hq = blockIdx.x;
    const int b = blockIdx.z;
    const int hkv = hq / p.group;

    const int len = min(max(p.seq_lens[b], 0), p.max_len);
    const int first = min(m0, p.tq - 1);
    const int last = min(m0 + M, p.tq) - 1;
    const int pos_first = len - p.tq + first;
    const int pos_last = len - p.tq + last;
    const int lo = p.window > 0 ? max(0, pos_first - p.window + 1) : 0;
    const int hi = p.causal ? min(len, pos_last + 1) : len;

    // Keys [tile0, tile0 + PREFILL_N) of K or V into `dst`, one group; keys past the chunk and keys of
    // out-of-range pages are zero-filled. Each thread copies the 16-byte vector cvec of the keys ckey, ckey +
    // KEY_STEP, ...: in a contiguous cache one stride apart, so a key costs one add.
    static_assert(PREFILL_THREADS % VECS == 0, "the block's threads cover whole keys");
    constexpr int KEY_STEP = PREFILL_THREADS / VECS;
    const int cvec = tid % VECS, ckey = tid / VECS;
    auto copy_tile = [&](bf16_t (*dst)[Shared::PITCH], const bf16_t* cache, i64 s_seq, i64 s_tok, i64 s_head,
                         int tile0) {
        if (p.page_table == nullptr) {
            const bf16_t* src = cache + (i64)b * s_seq + (i64)(tile0 + ckey) * s_tok + (i64)hkv * s_head + cvec * 8;
            const i64 step = KEY_STEP * s_tok;
#pragma unroll
            for (int key = ckey; key < PREFILL_N; key += KEY_STEP, src += step) {
                const bool valid = tile0 + key < hi;
                cp_async_16(&dst[key][cvec * 8], valid ? src : cache, valid);
            }
        } else {
            // Not unrolled: the page lookups' addresses would cost registers while the accumulator is live.
#pragma unroll 1
            for (int key = ckey; key < PREFILL_N; key += KEY_STEP) {
                const int j = tile0 + key;
                const i64 off = j < hi ? cache_offset(p, b, j, hkv, s_seq, s_tok, s_head) : -1;
                cp_async_16(&dst[key][cvec * 8], cache + max(off, (i64)0) + cvec * 8, off >= 0);
            }
        }
        cp_async_commit();
    };
    auto copy_k = [&](int tile0) { copy_tile(s.k, p.k, p.k_stride_seq, p.k_stride_token, p.k_stride_head, tile0); };
    auto copy_v = [&](int tile0) { copy_tile(s.v, p.v, p.v_stride_seq, p.v_stride_token, p.v_stride_head, tile0); };

    // Q rows of this CTA (rows past T are zero and masked), then the first K tile.
    for (int i = tid; i < M * VECS; i += PREFILL_THREADS) {
        const int r = i / VECS, vec = i % VECS;
        const int t = m0 + r;
        const bool valid = t < p.tq;
        const bf16_t* src = p.q + (i64)b * p.q_stride_batch + (i64)(valid ? t : 0) * p.q_stride_token +
                            (i64)hq * p.q_stride_head + vec * 8;
        cp_async_16(&s.q[r][vec * 8], src, valid);
    }
    cp_async_commit();
    if (lo < hi) copy_k(lo);

    float o[DT][4];
#pragma unroll
    for (int i = 0; i < DT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[i][e] = 0.0f;
    // Running max (log2 units) and this lane's share of the running sum of the rows g and g + 8.
    float m_row[2] = {neg_inf(), neg_inf()};
    float l_row[2] = {0.0f, 0.0f};
    // Query positions of this thread's two rows (g and g + 8 of the warp's 16).
    int t_row[2], pos_row[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        t_row[h] = m0 + rows16 * 16 + g + 8 * h;
        pos_row[h] = len - p.tq + t_row[h];
    }

    // The warp's rows: tokens [w_first, w_last] at positions [w_pos_first, w_pos_last]. A tile of keys inside
    // every one of their visible ranges needs no per-element mask.
    const int w_first = m0 + rows16 * 16;
    const int w_last = min(w_first + 15, p.tq - 1);
    const int w_pos_first = len - p.tq + w_first, w_pos_last = len - p.tq + w_last;
    for (int tile0 = lo; tile0 < hi; tile0 += PREFILL_N) {
        // K of this tile (and q) landed; every warp is done with the previous tile's V, whose buffer the V
        // copies overwrite while S runs.
        cp_async_wait<0>();
        __syncthreads();
        copy_v(tile0);
        const bool full = w_first + 15 < p.tq && tile0 + PREFILL_N <= hi &&
                          (!p.causal || tile0 + PREFILL_N - 1 <= w_pos_first) &&
                          (p.window <= 0 || tile0 > w_pos_last - p.window);

        // S = Q K^T for the warp's 16 rows and the tile's 32 keys.
        float sc[NT][4];
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) sc[n][e] = 0.0f;
        // Unrolled 8 k steps at a time: unrolled whole, D = 256 spilled on sm_110.
#pragma unroll 8
        for (int kk = 0; kk < D / 16; ++kk) {
            unsigned a[4];
            ldmatrix_x4(a, &s.q[rows16 * 16 + (lane & 15)][kk * 16 + (lane >> 4) * 8]);
#pragma unroll
            for (int n2 = 0; n2 < NT / 2; ++n2) {
                unsigned bk[4];
                ldmatrix_x4(bk, &s.k[n2 * 16 + (lane & 7) + (lane >> 4) * 8][kk * 16 + ((lane >> 3) & 1) * 8]);
                mma_bf16_16816(sc[2 * n2], a, bk[0], bk[1]);
                mma_bf16_16816(sc[2 * n2 + 1], a, bk[2], bk[3]);
            }
        }

        // Softcap, scale (log2 units), mask; online softmax per row (a row's 32 values sit in the 4 lanes of
        // a quad).
        if (p.softcap > 0.0f) {
#pragma unroll
            for (int n = 0; n < NT; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) sc[n][e] = softcap_logit(sc[n][e] * p.scale, p.softcap);
        }
        const float to_log2 = p.softcap > 0.0f ? LOG2E : p.scale * LOG2E;
        bool moved = false;
        float alpha_row[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float mx = neg_inf();
#pragma unroll
            for (int n = 0; n < NT; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int j = tile0 + n * 8 + 2 * c + e;
                    const int pos = pos_row[h];
                    const bool visible = full || (t_row[h] < p.tq && j < hi && (!p.causal || j <= pos) &&
                                         (p.window <= 0 || j > pos - p.window));
                    float x = sc[n][2 * h + e];
                    x = visible ? x * to_log2 : neg_inf();
                    sc[n][2 * h + e] = x;
                    mx = fmaxf(mx, x);
                }
            alpha_row[h] = softmax_rows_step(sc, h, mx, m_row[h], l_row[h], moved);
        }
        rescale_rows(o, alpha_row, moved);

        // P as bf16 A fragments (16 keys each), packed before the wait for V: the fp32 scores are not live
        // across it.
        unsigned pa[PREFILL_N / 16][4];
#pragma unroll
        for (int kc = 0; kc < PREFILL_N / 16; ++kc) {
            pa[kc][0] = pack_bf16x2(sc[2 * kc][0], sc[2 * kc][1]);
            pa[kc][1] = pack_bf16x2(sc[2 * kc][2], sc[2 * kc][3]);
            pa[kc][2] = pack_bf16x2(sc[2 * kc + 1][0], sc[2 * kc + 1][1]);
            pa[kc][3] = pack_bf16x2(sc[2 * kc + 1][2], sc[2 * kc + 1][3]);
        }
        // V of this tile landed; every warp is done with its K, whose buffer the next tile's K copies
        // overwrite while P V runs.
        cp_async_wait<0>();
        __syncthreads();
        if (tile0 + PREFILL_N < hi) copy_k(tile0 + PREFILL_N);

        // O += P V for this warp's output dims [slice * DO, (slice + 1) * DO).
#pragma unroll
        for (int kc = 0; kc < PREFILL_N / 16; ++kc) {
            const unsigned (&a)[4] = pa[kc];
#pragma unroll
            for (int d2 = 0; d2 < DT / 2; ++d2) {
                unsigned bv[4];
                ldmatrix_x4_trans(
                    bv, &s.v[kc * 16 + (lane & 7) + ((lane >> 3) & 1) * 8][slice * T::DO + d2 * 16 + (lane >> 4) * 8]);
                mma_bf16_16816(o[2 * d2], a, bv[0], bv[1]);
                mma_bf16_16816(o[2 * d2 + 1], a, bv[2], bv[3]);
            }
        }
    }
    // Rows with no key tile at all (an empty range) still need their q copies retired.
    cp_async_wait<0>();

#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float l = l_row[h];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const int t = t_row[h];
        if (t >= p.tq) continue;
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        bf16_t* dst = p.out + (i64)b * p.out_stride_batch + (i64)t * p.out_stride_token + (i64)hq * p.out_stride_head +
                      slice * T::DO;
#pragma unroll
        for (int i = 0; i < DT; ++i) {
            *reinterpret_cast<unsigned*>(dst + i * 8 + 2 * c) = pack_bf16x2(o[i][2 * h] * inv, o[i][2 * h + 1] * inv);
        }
        if (p.lse != nullptr && c == 0 && slice == 0) {
            p.lse[((i64)b * p.tq + t) * p.hq + hq] = l > 0.0f ? (m_row[h] + __log2f(l)) * LN2 : neg_inf();
        }
    }
}
