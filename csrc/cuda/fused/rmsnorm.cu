// RMSNorm over rows of a bf16 matrix, with an optional fused residual add.
//
//   RESIDUAL == false:  out = x * rsqrt(mean(x^2) + eps) * (w + w_offset)
//   RESIDUAL == true:   r' = bf16(x + r); r = r'; out = r' * rsqrt(mean(r'^2) + eps) * (w + w_offset)
//
// w_offset is 0 for the plain `x * w` style (Gemma 4) and 1 for the `x * (1 + w)` style (Qwen3.5). The norm
// of the fused form is taken over the rounded r', the value written back, so that it equals an unfused add
// followed by RMSNorm. One block per row; each thread keeps VPT 16-byte vectors of its row in registers, so
// the row is read once and written once.
#include "common/common.cuh"

template <int VPT, bool RESIDUAL>
__global__ void __launch_bounds__(256, 1) rmsnorm_kernel(const bf16_t* __restrict__ x, i64 x_row_stride,
                                                      bf16_t* residual, i64 residual_row_stride,
                                                      const bf16_t* __restrict__ weight, bf16_t* out,
                                                      i64 out_row_stride, int dim, float eps, float w_offset) {
    __shared__ float scratch[32];
    pdl_wait();
    pdl_launch_dependents();
    const i64 row = blockIdx.x;
    const int num_vec = dim >> 3;
    const bf16_t* x_row = x + row * x_row_stride;
    bf16_t* r_row = RESIDUAL ? residual + row * residual_row_stride : nullptr;
    bf16_t* out_row = out + row * out_row_stride;

    // The row stays in registers as packed bf16 (4 registers per 8 values) between the two passes, which
    // keeps the largest variant (8 vectors per thread) clear of spills; unpacking twice costs two ALU ops.
    uint4 vals[VPT];
    uint4 raw_r[VPT];
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
        const int v = threadIdx.x + i * blockDim.x;
        if (v < num_vec) {
            vals[i] = load_u128_ro(x_row + v * 8);
            if (RESIDUAL) raw_r[i] = load_u128(r_row + v * 8);
        }
    }

    float sum_sq = 0.0f;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
        const int v = threadIdx.x + i * blockDim.x;
        if (v < num_vec) {
            float f[8];
            bf16x8_to_f32(vals[i], f);
            if (RESIDUAL) {
                float r[8];
                bf16x8_to_f32(raw_r[i], r);
#pragma unroll
                for (int j = 0; j < 8; ++j) f[j] += r[j];
                vals[i] = f32_to_bf16x8(f);
                store_u128(r_row + v * 8, vals[i]);
                bf16x8_to_f32(vals[i], f);
            }
#pragma unroll
            for (int j = 0; j < 8; ++j) sum_sq += f[j] * f[j];
        }
    }

    sum_sq = block_reduce_sum(sum_sq, scratch);
    const float inv_rms = rsqrtf(sum_sq / (float)dim + eps);

#pragma unroll
    for (int i = 0; i < VPT; ++i) {
        const int v = threadIdx.x + i * blockDim.x;
        if (v < num_vec) {
            float w[8], f[8], o[8];
            bf16x8_to_f32(load_u128_ro(weight + v * 8), w);
            bf16x8_to_f32(vals[i], f);
#pragma unroll
            for (int j = 0; j < 8; ++j) o[j] = f[j] * inv_rms * (w[j] + w_offset);
            store_u128(out_row + v * 8, f32_to_bf16x8(o));
        }
    }
}
