// GEMV / skinny GEMM for decode: y[M, N] = x[M, K] . W[N, K]^T, bf16 inputs, fp32 accumulation.
//
// Decode is bound by reading W once. One warp owns one row of W: its lanes stream the row in 16-byte
// vectors, UNROLL vectors per lane in flight before the first use, and multiply each vector with the
// matching slice of all M rows of x (x is small and stays in L1/L2). W bypasses L1 so that L1 keeps x.
#include "common/common.cuh"

constexpr int GEMV_WARPS = 8;
constexpr int GEMV_UNROLL = 8;

template <int M, typename OutT>
__global__ void __launch_bounds__(GEMV_WARPS * 32, 1) gemv_kernel(const bf16_t* __restrict__ x, i64 x_row_stride,
                                                               const bf16_t* __restrict__ w, i64 w_row_stride,
                                                               OutT* __restrict__ y, i64 y_row_stride, int n,
                                                               int k) {
    const int lane = threadIdx.x & 31;
    const i64 row = (i64)blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    if (row >= n) return;
    const bf16_t* w_row = w + row * w_row_stride;
    const int num_vec = k >> 3;

    float acc[M];
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = 0.0f;

    for (int base = 0; base < num_vec; base += 32 * GEMV_UNROLL) {
        uint4 wv[GEMV_UNROLL];
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u) {
            const int v = base + u * 32 + lane;
            wv[u] = v < num_vec ? load_u128_stream(w_row + (i64)v * 8) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u) {
            const int v = base + u * 32 + lane;
            if (v < num_vec) {
                float wf[8];
                bf16x8_to_f32(wv[u], wf);
#pragma unroll
                for (int m = 0; m < M; ++m) {
                    float xf[8];
                    bf16x8_to_f32(load_u128_ro(x + m * x_row_stride + (i64)v * 8), xf);
#pragma unroll
                    for (int j = 0; j < 8; ++j) acc[m] = fmaf(wf[j], xf[j], acc[m]);
                }
            }
        }
    }

#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = warp_reduce_sum(acc[m]);
    // Lane m stores row m's result, so the M stores go out in one instruction.
#pragma unroll
    for (int m = 0; m < M; ++m) {
        if (lane == m) OutputStore<OutT>::store(y + m * y_row_stride + row, acc[m]);
    }
}
