/* C++ convenience wrappers for the fused kernels (RMSNorm with optional residual).
 * Header-only: inline functions over the C API in <sparkinfer/sparkinfer.h>. */
#ifndef SPARKINFER_KERNELS_FUSED_H
#define SPARKINFER_KERNELS_FUSED_H

#include "../sparkinfer.h"

namespace sparkinfer {
namespace kernels {

enum class WeightStyle : int32_t {
    /* out = x_hat * w (Gemma 4) */
    Plain = SPARKINFER_WEIGHT_STYLE_PLAIN,
    /* out = x_hat * (1 + w) (Qwen3.5) */
    OffsetOne = SPARKINFER_WEIGHT_STYLE_OFFSET_ONE,
};

/* out[rows, dim] = rmsnorm(x) * w', all bf16, dense rows. `out` may equal `x`. */
inline sparkinfer_status launch_rmsnorm(sparkinfer_context *ctx, const void *x, const void *weight, void *out,
                                        int64_t rows, int64_t dim, float eps, WeightStyle style,
                                        sparkinfer_stream stream) {
    sparkinfer_rmsnorm_params p = {};
    p.x = x;
    p.weight = weight;
    p.out = out;
    p.rows = rows;
    p.dim = dim;
    p.eps = eps;
    p.weight_style = static_cast<int32_t>(style);
    return sparkinfer_rmsnorm(ctx, &p, stream);
}

/* residual = bf16(x + residual); out = rmsnorm(residual) * w', in one pass. */
inline sparkinfer_status launch_rmsnorm_residual(sparkinfer_context *ctx, const void *x, void *residual,
                                                 const void *weight, void *out, int64_t rows, int64_t dim,
                                                 float eps, WeightStyle style, sparkinfer_stream stream) {
    sparkinfer_rmsnorm_params p = {};
    p.x = x;
    p.residual = residual;
    p.weight = weight;
    p.out = out;
    p.rows = rows;
    p.dim = dim;
    p.eps = eps;
    p.weight_style = static_cast<int32_t>(style);
    return sparkinfer_rmsnorm(ctx, &p, stream);
}

} /* namespace kernels */
} /* namespace sparkinfer */

#endif /* SPARKINFER_KERNELS_FUSED_H */
