// GEMV / skinny GEMM for decode: y[M, N] = x[M, K] . W[N, K]^T, bf16 inputs, fp32 accumulation.
//
// Decode is bound by reading W once. Warps are persistent: the grid holds as many blocks as the GPU runs
// at once, and each warp walks rows n = warp, warp + total_warps, ... Its lanes stream a row in 16-byte
// vectors, UNROLL per lane per step, and the loads of the next step (the next slice of the row, or the
// first slice of the warp's next row) are issued before the current step is multiplied, so the memory
// pipe never drains at a row boundary and no block launches in the middle of the kernel. Each W vector
// multiplies the matching slice of all M rows of x (x is small and stays in L1/L2); W bypasses L1.
#include "common/common.cuh"

constexpr int GEMV_WARPS = 8;
constexpr int GEMV_UNROLL = 8;

SPK_DEVICE void gemv_load_step(uint4 (&dst)[GEMV_UNROLL], const bf16_t* w_row, int base, int num_vec, int lane) {
#pragma unroll
    for (int u = 0; u < GEMV_UNROLL; ++u) {
        const int v = base + u * 32 + lane;
        dst[u] = v < num_vec ? load_u128_stream(w_row + (i64)v * 8) : make_uint4(0, 0, 0, 0);
    }
}

template <int M, typename OutT>
__global__ void __launch_bounds__(GEMV_WARPS * 32, 1) gemv_kernel(const bf16_t* __restrict__ x, i64 x_row_stride,
                                                                  const bf16_t* __restrict__ w, i64 w_row_stride,
                                                                  OutT* __restrict__ y, i64 y_row_stride, int n,
                                                                  int k) {
    pdl_wait();
    pdl_launch_dependents();
    const int lane = threadIdx.x & 31;
    const i64 total_warps = (i64)gridDim.x * GEMV_WARPS;
    i64 row = (i64)blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    const int num_vec = k >> 3;
    constexpr int STEP = 32 * GEMV_UNROLL;

    uint4 cur[GEMV_UNROLL];
    if (row < n) gemv_load_step(cur, w + row * w_row_stride, 0, num_vec, lane);

    while (row < n) {
        const i64 next_row = row + total_warps;
        float acc[M];
#pragma unroll
        for (int m = 0; m < M; ++m) acc[m] = 0.0f;

        for (int base = 0; base < num_vec; base += STEP) {
            uint4 nxt[GEMV_UNROLL];
            if (base + STEP < num_vec) {
                gemv_load_step(nxt, w + row * w_row_stride, base + STEP, num_vec, lane);
            } else if (next_row < n) {
                gemv_load_step(nxt, w + next_row * w_row_stride, 0, num_vec, lane);
            }
#pragma unroll
            for (int u = 0; u < GEMV_UNROLL; ++u) {
                const int v = base + u * 32 + lane;
                if (v < num_vec) {
                    float wf[8];
                    bf16x8_to_f32(cur[u], wf);
#pragma unroll
                    for (int m = 0; m < M; ++m) {
                        float xf[8];
                        bf16x8_to_f32(load_u128_ro(x + m * x_row_stride + (i64)v * 8), xf);
#pragma unroll
                        for (int j = 0; j < 8; ++j) acc[m] = fmaf(wf[j], xf[j], acc[m]);
                    }
                }
            }
#pragma unroll
            for (int u = 0; u < GEMV_UNROLL; ++u) cur[u] = nxt[u];
        }

#pragma unroll
        for (int m = 0; m < M; ++m) acc[m] = warp_reduce_sum(acc[m]);
        // Lane m stores row m's result, so the M stores go out in one instruction.
#pragma unroll
        for (int m = 0; m < M; ++m) {
            if (lane == m) OutputStore<OutT>::store(y + m * y_row_stride + row, acc[m]);
        }
        row = next_row;
    }
}
