// GEMV / skinny GEMM for decode: y[M, N] = x[M, K] . W[N, K]^T, bf16 inputs, fp32 accumulation.
//
// Decode is bound by reading W once. Each warp owns GEMV_ROWS rows of W: its lanes stream them in
// 16-byte vectors, GEMV_UNROLL vectors per row per lane, all loads of a step in flight before the first
// use, and multiply each vector with the matching slice of all M rows of x (x is small and stays in
// L1/L2); W bypasses L1.
#include "common/common.cuh"

constexpr int GEMV_WARPS = 8;
constexpr int GEMV_UNROLL = 8;

// One step of W: UNROLL 16-byte vectors per lane for each of the warp's rows (zeros past the end).
template <int ROWS>
SPK_DEVICE void gemv_load_rows(uint4 (&wv)[ROWS][GEMV_UNROLL], const bf16_t* w, i64 w_row_stride, i64 row0, int n,
                               int base, int num_vec, int lane) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const bool row_ok = row0 + r < n;
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u) {
            const int v = base + u * 32 + lane;
            wv[r][u] = (row_ok && v < num_vec) ? load_u128_stream(w + (row0 + r) * w_row_stride + (i64)v * 8)
                                              : make_uint4(0, 0, 0, 0);
        }
    }
}

// ROWS = 2 for M >= 8 halves the L1 traffic for x per byte of W, which is what bounds large M (H100,
// M=16, 8192x2048: 51.5 -> 38.0 us); for small M one row per warp keeps more warps resident.
// EARLY_W: the caller promised that W is not written by the kernel just before this one on the stream
// (model weights never are during decode), so the first step of W is loaded before pdl_wait() and
// streams in while that kernel finishes; x and y are touched only after the wait.
template <int M, int GEMV_ROWS, bool EARLY_W, typename OutT>
__global__ void __launch_bounds__(GEMV_WARPS * 32, 1) gemv_kernel(const bf16_t* __restrict__ x, i64 x_row_stride,
                                                                  const bf16_t* __restrict__ w, i64 w_row_stride,
                                                                  OutT* __restrict__ y, i64 y_row_stride, int n,
                                                                  int k) {
    const int lane = threadIdx.x & 31;
    const i64 row0 = ((i64)blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5)) * GEMV_ROWS;
    const int num_vec = k >> 3;
    uint4 wv[GEMV_ROWS][GEMV_UNROLL];
    if (EARLY_W && row0 < n) gemv_load_rows<GEMV_ROWS>(wv, w, w_row_stride, row0, n, 0, num_vec, lane);
    pdl_wait();
    pdl_launch_dependents();
    if (row0 >= n) return;

    float acc[GEMV_ROWS][M];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m) acc[r][m] = 0.0f;

    for (int base = 0; base < num_vec; base += 32 * GEMV_UNROLL) {
        if (!EARLY_W || base > 0) gemv_load_rows<GEMV_ROWS>(wv, w, w_row_stride, row0, n, base, num_vec, lane);
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u) {
            const int v = base + u * 32 + lane;
            if (v < num_vec) {
#pragma unroll
                for (int m = 0; m < M; ++m) {
                    float xf[8];
                    bf16x8_to_f32(load_u128_ro(x + m * x_row_stride + (i64)v * 8), xf);
#pragma unroll
                    for (int r = 0; r < GEMV_ROWS; ++r) {
                        float wf[8];
                        bf16x8_to_f32(wv[r][u], wf);
#pragma unroll
                        for (int j = 0; j < 8; ++j) acc[r][m] = fmaf(wf[j], xf[j], acc[r][m]);
                    }
                }
            }
        }
    }

#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r) {
#pragma unroll
        for (int m = 0; m < M; ++m) acc[r][m] = warp_reduce_sum(acc[r][m]);
        // Lane m stores row m's result, so the M stores go out in one instruction.
        if (row0 + r < n) {
#pragma unroll
            for (int m = 0; m < M; ++m) {
                if (lane == m) OutputStore<OutT>::store(y + m * y_row_stride + row0 + r, acc[r][m]);
            }
        }
    }
}
