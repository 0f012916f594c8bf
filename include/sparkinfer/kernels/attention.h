/*
 * sparkinfer C++ wrappers: decode attention ("flash decode") at the shapes of the target models.
 *
 * Inline functions over the C API of sparkinfer.h (sparkinfer_attention_decode and its workspace query),
 * namespace sparkinfer::kernels. Each named entry point fills in the shape facts of its layer and leaves the
 * rest of the params (tensors, strides, batch, q_len, max_seq_len, causal, workspace) to the caller:
 *
 *   launch_flash_decode               head_dim 128, any supported GQA group; heads and scale from params
 *   launch_flash_decode_gqa8          Qwen3.5 full attention: 16 query / 2 KV heads, head_dim 256, scale 1/16
 *   launch_flash_decode_local_hd256   Gemma 4 local: 16 / 8 heads, head_dim 256, window 1024, scale 1.0
 *   launch_flash_decode_global_hd512  Gemma 4 global: 16 / 2 heads, head_dim 512, scale 1.0 (K and V are the
 *                                     distinct caches of params.k_cache and params.v_cache)
 *
 * The matching *_workspace_size functions return the bytes of workspace for the same params on a context.
 * launch_attention_decode and launch_attention_prefill are the general ops (prefill: q_len up to 8192).
 * All return a sparkinfer_status; sparkinfer_last_error() says what failed.
 */
#ifndef SPARKINFER_KERNELS_ATTENTION_H
#define SPARKINFER_KERNELS_ATTENTION_H

#include "../sparkinfer.h"

#ifdef __cplusplus

namespace sparkinfer {
namespace kernels {

/* The general op: every field of params is the caller's. */
inline sparkinfer_status launch_attention_decode(const sparkinfer_context *ctx,
                                                 const sparkinfer_attention_decode_params &params,
                                                 sparkinfer_stream stream) {
    return sparkinfer_attention_decode(ctx, &params, stream);
}

/* Prefill of q_len = 1 to 8192 tokens on tensor cores, same params (every head_dim; no workspace). */
inline sparkinfer_status launch_attention_prefill(const sparkinfer_context *ctx,
                                                  const sparkinfer_attention_decode_params &params,
                                                  sparkinfer_stream stream) {
    return sparkinfer_attention_prefill(ctx, &params, stream);
}

inline sparkinfer_status attention_decode_workspace_size(const sparkinfer_context *ctx,
                                                         const sparkinfer_attention_decode_params &params,
                                                         size_t *bytes) {
    return sparkinfer_attention_decode_workspace_size(ctx, &params, bytes);
}

/* The shape facts of each named layer (MODELS.md), applied to a copy of the caller's params. */
inline sparkinfer_attention_decode_params flash_decode_shape(sparkinfer_attention_decode_params p) {
    p.head_dim = 128;
    return p;
}

inline sparkinfer_attention_decode_params flash_decode_gqa8_shape(sparkinfer_attention_decode_params p) {
    p.num_q_heads = 16;
    p.num_kv_heads = 2;
    p.head_dim = 256;
    p.scale = 1.0f / 16.0f;
    p.window = SPARKINFER_ATTENTION_NO_WINDOW;
    p.softcap = 0.0f;
    return p;
}

inline sparkinfer_attention_decode_params flash_decode_local_hd256_shape(sparkinfer_attention_decode_params p) {
    p.num_q_heads = 16;
    p.num_kv_heads = 8;
    p.head_dim = 256;
    p.scale = 1.0f;
    p.window = 1024;
    p.softcap = 0.0f;
    return p;
}

inline sparkinfer_attention_decode_params flash_decode_global_hd512_shape(sparkinfer_attention_decode_params p) {
    p.num_q_heads = 16;
    p.num_kv_heads = 2;
    p.head_dim = 512;
    p.scale = 1.0f;
    p.window = SPARKINFER_ATTENTION_NO_WINDOW;
    p.softcap = 0.0f;
    return p;
}

/* head_dim 128 with the caller's heads (any supported group), scale, window and softcap. */
inline sparkinfer_status launch_flash_decode(const sparkinfer_context *ctx, const sparkinfer_attention_decode_params &params,
                                             sparkinfer_stream stream) {
    const sparkinfer_attention_decode_params p = flash_decode_shape(params);
    return sparkinfer_attention_decode(ctx, &p, stream);
}

inline sparkinfer_status launch_flash_decode_gqa8(const sparkinfer_context *ctx,
                                                  const sparkinfer_attention_decode_params &params,
                                                  sparkinfer_stream stream) {
    const sparkinfer_attention_decode_params p = flash_decode_gqa8_shape(params);
    return sparkinfer_attention_decode(ctx, &p, stream);
}

inline sparkinfer_status launch_flash_decode_local_hd256(const sparkinfer_context *ctx,
                                                         const sparkinfer_attention_decode_params &params,
                                                         sparkinfer_stream stream) {
    const sparkinfer_attention_decode_params p = flash_decode_local_hd256_shape(params);
    return sparkinfer_attention_decode(ctx, &p, stream);
}

inline sparkinfer_status launch_flash_decode_global_hd512(const sparkinfer_context *ctx,
                                                          const sparkinfer_attention_decode_params &params,
                                                          sparkinfer_stream stream) {
    const sparkinfer_attention_decode_params p = flash_decode_global_hd512_shape(params);
    return sparkinfer_attention_decode(ctx, &p, stream);
}

inline sparkinfer_status flash_decode_workspace_size(const sparkinfer_context *ctx,
                                                     const sparkinfer_attention_decode_params &params, size_t *bytes) {
    const sparkinfer_attention_decode_params p = flash_decode_shape(params);
    return sparkinfer_attention_decode_workspace_size(ctx, &p, bytes);
}

inline sparkinfer_status flash_decode_gqa8_workspace_size(const sparkinfer_context *ctx,
                                                          const sparkinfer_attention_decode_params &params,
                                                          size_t *bytes) {
    const sparkinfer_attention_decode_params p = flash_decode_gqa8_shape(params);
    return sparkinfer_attention_decode_workspace_size(ctx, &p, bytes);
}

inline sparkinfer_status flash_decode_local_hd256_workspace_size(const sparkinfer_context *ctx,
                                                                 const sparkinfer_attention_decode_params &params,
                                                                 size_t *bytes) {
    const sparkinfer_attention_decode_params p = flash_decode_local_hd256_shape(params);
    return sparkinfer_attention_decode_workspace_size(ctx, &p, bytes);
}

inline sparkinfer_status flash_decode_global_hd512_workspace_size(const sparkinfer_context *ctx,
                                                                  const sparkinfer_attention_decode_params &params,
                                                                  size_t *bytes) {
    const sparkinfer_attention_decode_params p = flash_decode_global_hd512_shape(params);
    return sparkinfer_attention_decode_workspace_size(ctx, &p, bytes);
}

}  // namespace kernels
}  // namespace sparkinfer

#endif /* __cplusplus */
#endif /* SPARKINFER_KERNELS_ATTENTION_H */
