// C++ convenience wrappers over the MoE functions of the C API (sparkinfer.h): short names, typed
// pointers, the stream last. Every wrapper returns the sparkinfer_status of the C call; on failure
// sparkinfer_last_error() says which argument or call failed. Tensors are dense (row stride 0) unless a
// params struct is passed directly. bf16 tensors are passed as `const void*` (any 16-bit bf16 type).
#pragma once

#include <cstddef>
#include <cstdint>

#include "../sparkinfer.h"

namespace sparkinfer {
namespace kernels {

// logits[tokens, experts] (fp32) = x[tokens, hidden] · router_weight[experts, hidden]ᵀ. With input_scale
// non-NULL the input is Gemma 4's RMSNorm-without-weight(x) · input_scale · hidden^-0.5.
inline sparkinfer_status launch_router_gemm(const sparkinfer_context* ctx, const void* x, const void* router_weight,
                                            float* logits, int64_t tokens, int64_t hidden, int64_t experts,
                                            sparkinfer_stream stream, const void* input_scale = nullptr,
                                            float eps = 1e-6f) {
    sparkinfer_router_gemm_params p{};
    p.x = x;
    p.weight = router_weight;
    p.input_scale = input_scale;
    p.eps = eps;
    p.logits = logits;
    p.tokens = tokens;
    p.hidden = hidden;
    p.experts = experts;
    return sparkinfer_router_gemm(ctx, &p, stream);
}

// Softmax (or sigmoid) → top-k → renormalise → × expert_scale; the expert counts, offsets and the
// expert-grouped slot order stay in GPU memory.
inline sparkinfer_status launch_topk_router(const sparkinfer_context* ctx, const float* logits, int64_t tokens,
                                            int64_t experts, int64_t top_k, int32_t* topk_ids,
                                            float* topk_weights, int32_t* expert_counts, int32_t* expert_offsets,
                                            int32_t* sorted_slots, sparkinfer_stream stream,
                                            int32_t scoring = SPARKINFER_SCORING_SOFTMAX, bool renormalize = true,
                                            const float* expert_scale = nullptr) {
    sparkinfer_topk_router_params p{};
    p.logits = logits;
    p.tokens = tokens;
    p.experts = experts;
    p.top_k = top_k;
    p.scoring = scoring;
    p.renormalize = renormalize ? 1 : 0;
    p.expert_scale = expert_scale;
    p.topk_ids = topk_ids;
    p.topk_weights = topk_weights;
    p.expert_counts = expert_counts;
    p.expert_offsets = expert_offsets;
    p.sorted_slots = sorted_slots;
    return sparkinfer_topk_router(ctx, &p, stream);
}

// Workspace bytes of launch_group_gemm_swiglu / launch_group_gemm_geglu / launch_expert_ffn.
inline sparkinfer_status expert_ffn_workspace_size(int64_t tokens, int64_t hidden, int64_t top_k, int64_t inter,
                                                   int64_t dense_inter, size_t* bytes) {
    return sparkinfer_expert_ffn_workspace_size(tokens, hidden, top_k, inter, dense_inter, bytes);
}

// Any expert FFN call, with the full params struct.
inline sparkinfer_status launch_expert_ffn(const sparkinfer_context* ctx, const sparkinfer_expert_ffn_params& p,
                                           void* workspace, size_t workspace_bytes, sparkinfer_stream stream) {
    return sparkinfer_expert_ffn(ctx, &p, workspace, workspace_bytes, stream);
}

namespace detail {
inline sparkinfer_status routed_ffn(const sparkinfer_context* ctx, int32_t activation, const void* x, void* out,
                                    int64_t tokens, int64_t hidden, const void* gate_up, const void* down,
                                    int64_t experts, int64_t inter, int64_t top_k, const int32_t* topk_ids,
                                    const float* topk_weights, const int32_t* expert_offsets,
                                    const int32_t* sorted_slots, void* workspace, size_t workspace_bytes,
                                    sparkinfer_stream stream, bool accumulate) {
    sparkinfer_expert_ffn_params p{};
    p.x = x;
    p.out = out;
    p.accumulate = accumulate ? 1 : 0;
    p.tokens = tokens;
    p.hidden = hidden;
    p.activation = activation;
    p.gate_up = gate_up;
    p.down = down;
    p.experts = experts;
    p.inter = inter;
    p.top_k = top_k;
    p.topk_ids = topk_ids;
    p.topk_weights = topk_weights;
    p.expert_offsets = expert_offsets;
    p.sorted_slots = sorted_slots;
    return sparkinfer_expert_ffn(ctx, &p, workspace, workspace_bytes, stream);
}
}  // namespace detail

// out[t] (+)= Σ_j w_tj · down_e(silu(gate_e · x_t) ⊙ (up_e · x_t)) over the routing of launch_topk_router;
// gate_up [experts, 2·inter, hidden] (gate rows first), down [experts, hidden, inter].
inline sparkinfer_status launch_group_gemm_swiglu(const sparkinfer_context* ctx, const void* x, void* out,
                                                  int64_t tokens, int64_t hidden, const void* gate_up,
                                                  const void* down, int64_t experts, int64_t inter, int64_t top_k,
                                                  const int32_t* topk_ids, const float* topk_weights,
                                                  const int32_t* expert_offsets, const int32_t* sorted_slots,
                                                  void* workspace, size_t workspace_bytes, sparkinfer_stream stream,
                                                  bool accumulate = false) {
    return detail::routed_ffn(ctx, SPARKINFER_ACTIVATION_SILU, x, out, tokens, hidden, gate_up, down, experts, inter,
                              top_k, topk_ids, topk_weights, expert_offsets, sorted_slots, workspace,
                              workspace_bytes, stream, accumulate);
}

// As launch_group_gemm_swiglu with gelu_tanh (Gemma 4's GeGLU).
inline sparkinfer_status launch_group_gemm_geglu(const sparkinfer_context* ctx, const void* x, void* out,
                                                 int64_t tokens, int64_t hidden, const void* gate_up,
                                                 const void* down, int64_t experts, int64_t inter, int64_t top_k,
                                                 const int32_t* topk_ids, const float* topk_weights,
                                                 const int32_t* expert_offsets, const int32_t* sorted_slots,
                                                 void* workspace, size_t workspace_bytes, sparkinfer_stream stream,
                                                 bool accumulate = false) {
    return detail::routed_ffn(ctx, SPARKINFER_ACTIVATION_GELU_TANH, x, out, tokens, hidden, gate_up, down, experts,
                              inter, top_k, topk_ids, topk_weights, expert_offsets, sorted_slots, workspace,
                              workspace_bytes, stream, accumulate);
}

// out[t] (+)= g_t · down(act(gate · x_t) ⊙ (up · x_t)) with g_t = sigmoid(x_t · gate_weight), or 1 when
// gate_weight is NULL: Qwen3.5's shared expert (SiLU, gated) or Gemma 4's dense MLP (GELU-tanh, ungated).
inline sparkinfer_status launch_dense_ffn(const sparkinfer_context* ctx, int32_t activation, const void* x,
                                          void* out, int64_t tokens, int64_t hidden, const void* gate_up,
                                          const void* down, int64_t inter, const void* gate_weight,
                                          void* workspace, size_t workspace_bytes, sparkinfer_stream stream,
                                          bool accumulate = true) {
    sparkinfer_expert_ffn_params p{};
    p.x = x;
    p.out = out;
    p.accumulate = accumulate ? 1 : 0;
    p.tokens = tokens;
    p.hidden = hidden;
    p.activation = activation;
    p.dense_gate_up = gate_up;
    p.dense_down = down;
    p.dense_inter = inter;
    p.dense_gate_weight = gate_weight;
    return sparkinfer_expert_ffn(ctx, &p, workspace, workspace_bytes, stream);
}

// Workspace bytes of launch_moe_forward.
inline sparkinfer_status moe_forward_workspace_size(int64_t tokens, int64_t hidden, int64_t experts, int64_t top_k,
                                                    int64_t inter, int64_t dense_inter, size_t* bytes) {
    return sparkinfer_moe_forward_workspace_size(tokens, hidden, experts, top_k, inter, dense_inter, bytes);
}

// The whole MoE block (router GEMM → top-k → routed experts + dense/shared FFN) on `stream`, with no host
// synchronisation: capturable in a CUDA graph.
inline sparkinfer_status launch_moe_forward(const sparkinfer_context* ctx, const sparkinfer_moe_forward_params& p,
                                            void* workspace, size_t workspace_bytes, sparkinfer_stream stream) {
    return sparkinfer_moe_forward(ctx, &p, workspace, workspace_bytes, stream);
}

}  // namespace kernels
}  // namespace sparkinfer
