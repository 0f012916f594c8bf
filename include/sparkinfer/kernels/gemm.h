/* C++ convenience wrappers for GEMV / skinny GEMM.
 * Header-only: inline functions over the C API in <sparkinfer/sparkinfer.h>. */
#ifndef SPARKINFER_KERNELS_GEMM_H
#define SPARKINFER_KERNELS_GEMM_H

#include "../sparkinfer.h"

namespace sparkinfer {
namespace kernels {

enum class DType : int32_t {
    BF16 = SPARKINFER_DTYPE_BF16,
    F32 = SPARKINFER_DTYPE_F32,
};

/* y[m, n] = x[m, k] . w[n, k]^T for m = 1..16, dense rows; bf16 inputs, fp32 accumulation.
 * weights_static: w is not written by the kernel just before this call (SPARKINFER_GEMV_WEIGHTS_STATIC). */
inline sparkinfer_status launch_gemv(sparkinfer_context *ctx, const void *x, const void *w, void *y, int64_t m,
                                     int64_t n, int64_t k, DType y_dtype, sparkinfer_stream stream,
                                     bool weights_static = false) {
    sparkinfer_gemv_params p = {};
    p.x = x;
    p.w = w;
    p.y = y;
    p.m = m;
    p.n = n;
    p.k = k;
    p.y_dtype = static_cast<int32_t>(y_dtype);
    p.flags = weights_static ? SPARKINFER_GEMV_WEIGHTS_STATIC : 0;
    return sparkinfer_gemv(ctx, &p, stream);
}

} /* namespace kernels */
} /* namespace sparkinfer */

#endif /* SPARKINFER_KERNELS_GEMM_H */
