//! The MoE ops of the C API: router GEMM, top-k router, expert FFN (+ dense FFN) and the whole block.

use super::context::{context_ref, sparkinfer_context, sparkinfer_stream};
use super::{guard, sparkinfer_status, write_out};
use crate::error::{Error, Result};
use crate::ops::moe::{self, DenseFfn, ExpertFfnArgs, MoeForwardArgs, RoutedExperts};
use crate::ops::Stream;
use crate::reference::moe::{Activation, Scoring};
use std::ffi::c_void;

/// Softmax in fp32 over all experts (Qwen3.5, Gemma 4).
pub const SPARKINFER_SCORING_SOFTMAX: i32 = 0;
/// An independent sigmoid per expert.
pub const SPARKINFER_SCORING_SIGMOID: i32 = 1;

/// `silu(gate) · up` (SwiGLU, Qwen3.5).
pub const SPARKINFER_ACTIVATION_SILU: i32 = 0;
/// `gelu_tanh(gate) · up` (GeGLU with the tanh approximation, Gemma 4).
pub const SPARKINFER_ACTIVATION_GELU_TANH: i32 = 1;

/// Router GEMM: `logits[t, e] = Σ_h f(x)[t, h] · weight[e, h]` in fp32, bf16 inputs. With `input_scale`
/// set, `f(x) = x · rsqrt(mean(x²) + eps) · input_scale · hidden^-0.5` (Gemma 4's router input: RMSNorm
/// without weight, a scale vector and a scalar), computed in fp32 inside the GEMM; otherwise `f(x) = x`.
/// Row strides in elements, 0 meaning dense.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct sparkinfer_router_gemm_params {
    /// bf16 [tokens, hidden], 16-byte aligned, row stride a multiple of 8.
    pub x: *const c_void,
    pub x_row_stride: i64,
    /// bf16 [experts, hidden], dense, 16-byte aligned.
    pub weight: *const c_void,
    /// bf16 [hidden], 16-byte aligned; NULL for no input transform.
    pub input_scale: *const c_void,
    /// Added to the mean square of the transform; finite, ≥ 0 (1e-6 for Gemma 4).
    pub eps: f32,
    /// fp32 [tokens, experts].
    pub logits: *mut c_void,
    pub logits_row_stride: i64,
    /// 1 to 65536.
    pub tokens: i64,
    /// Multiple of 8, at most 65536.
    pub hidden: i64,
    /// 1 to 512.
    pub experts: i64,
}

/// Top-k router over fp32 logits. Scores: softmax over all experts (SPARKINFER_SCORING_SOFTMAX) or
/// sigmoid (SPARKINFER_SCORING_SIGMOID). The top_k largest logits are chosen (ties to the lower expert
/// index; NaN ranks below every number), best first; their scores are divided by their sum when
/// `renormalize` is non-zero and multiplied by `expert_scale[e]` when given. Outputs, all in the context's
/// memory and never read by the host: `topk_ids` int32 [tokens, top_k], `topk_weights` fp32
/// [tokens, top_k], `expert_counts` int32 [experts], `expert_offsets` int32 [experts + 1] (exclusive scan
/// of the counts) and `sorted_slots` int32 [tokens · top_k]: the slots `t · top_k + j` grouped by
/// ascending expert, ascending inside an expert (deterministic).
///
/// NaN or ±∞ logits: ids stay valid experts in [0, experts) and the counts, offsets and slots stay
/// consistent; the weights of the affected token become NaN.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct sparkinfer_topk_router_params {
    /// fp32 [tokens, experts].
    pub logits: *const c_void,
    pub logits_row_stride: i64,
    /// 1 to 65536.
    pub tokens: i64,
    /// 1 to 512.
    pub experts: i64,
    /// 1 to 16, at most `experts`.
    pub top_k: i64,
    /// SPARKINFER_SCORING_SOFTMAX or SPARKINFER_SCORING_SIGMOID.
    pub scoring: i32,
    /// Non-zero: divide the selected scores by their sum (both target models).
    pub renormalize: i32,
    /// fp32 [experts] multiplied into the weights (Gemma 4's per_expert_scale); NULL for none.
    pub expert_scale: *const c_void,
    pub topk_ids: *mut c_void,
    pub topk_weights: *mut c_void,
    pub expert_counts: *mut c_void,
    pub expert_offsets: *mut c_void,
    pub sorted_slots: *mut c_void,
}

/// Expert FFN: `out[t] = Σ_j w_tj · Down_e(act(Gate_e · x_t) ⊙ (Up_e · x_t)) + g_t · DenseDown(act(DenseGate ·
/// x_t) ⊙ (DenseUp · x_t)) [+ out[t]]` with `e = topk_ids[t, j]`, `w_tj = topk_weights[t, j]` and
/// `g_t = sigmoid(x_t · dense_gate_weight)` (1 without a gate vector). bf16 weights, fp32 accumulation;
/// the intermediate `act(g) · u` is rounded to bf16, the output once at the end. Routed experts are
/// present when `gate_up` is non-NULL (the routing from sparkinfer_topk_router), the dense FFN when
/// `dense_gate_up` is non-NULL; at least one of them. Gate and up are fused per expert as
/// [2·inter, hidden] with the gate rows first (transformers' gate_up_proj); down is [hidden, inter].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct sparkinfer_expert_ffn_params {
    /// bf16 [tokens, hidden], 16-byte aligned, row stride a multiple of 8.
    pub x: *const c_void,
    pub x_row_stride: i64,
    /// bf16 [tokens, hidden]; must not overlap any input or the workspace.
    pub out: *mut c_void,
    pub out_row_stride: i64,
    /// Non-zero: add into the existing contents of `out`.
    pub accumulate: i32,
    /// 1 to 65536.
    pub tokens: i64,
    /// Multiple of 8, at most 65536.
    pub hidden: i64,
    /// SPARKINFER_ACTIVATION_SILU or SPARKINFER_ACTIVATION_GELU_TANH (routed and dense alike).
    pub activation: i32,
    /// bf16 [experts, 2·inter, hidden], 16-byte aligned; NULL for no routed experts.
    pub gate_up: *const c_void,
    /// bf16 [experts, hidden, inter], 16-byte aligned.
    pub down: *const c_void,
    /// 1 to 512.
    pub experts: i64,
    /// Multiple of 8.
    pub inter: i64,
    /// 1 to 16.
    pub top_k: i64,
    /// int32 [tokens, top_k], experts in [0, experts).
    pub topk_ids: *const c_void,
    /// fp32 [tokens, top_k].
    pub topk_weights: *const c_void,
    /// int32 [experts + 1], as built by sparkinfer_topk_router for `topk_ids`.
    pub expert_offsets: *const c_void,
    /// int32 [tokens · top_k], as built by sparkinfer_topk_router for `topk_ids`.
    pub sorted_slots: *const c_void,
    /// bf16 [2·dense_inter, hidden], 16-byte aligned; NULL for no dense FFN.
    pub dense_gate_up: *const c_void,
    /// bf16 [hidden, dense_inter], 16-byte aligned.
    pub dense_down: *const c_void,
    /// Multiple of 8.
    pub dense_inter: i64,
    /// bf16 [hidden]: the dense output is multiplied by sigmoid(x · dense_gate_weight) (Qwen3.5's shared
    /// expert gate); NULL for an ungated dense FFN (Gemma 4).
    pub dense_gate_weight: *const c_void,
}

/// The whole MoE block: router GEMM → top-k router → routed experts + dense FFN, as the three ops above
/// with their parameters of the same names (`router_weight`, `router_input_scale` and `router_eps` are
/// the router GEMM's `weight`, `input_scale` and `eps`). Everything runs on the stream with no host
/// synchronisation, so the call can be captured in a CUDA graph; the routing lives in the workspace.
///
/// NaN or ±∞ in a token's input (or weights that produce them): that token's output row becomes NaN; its
/// routing stays valid (experts in [0, experts), consistent counts), other tokens are unaffected, and
/// nothing outside `out` and the workspace is written.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct sparkinfer_moe_forward_params {
    pub x: *const c_void,
    pub x_row_stride: i64,
    pub out: *mut c_void,
    pub out_row_stride: i64,
    pub accumulate: i32,
    pub tokens: i64,
    pub hidden: i64,
    pub router_weight: *const c_void,
    pub router_input_scale: *const c_void,
    pub router_eps: f32,
    pub experts: i64,
    pub top_k: i64,
    pub scoring: i32,
    pub renormalize: i32,
    pub expert_scale: *const c_void,
    pub gate_up: *const c_void,
    pub down: *const c_void,
    pub inter: i64,
    pub activation: i32,
    pub dense_gate_up: *const c_void,
    pub dense_down: *const c_void,
    pub dense_inter: i64,
    pub dense_gate_weight: *const c_void,
}

fn params_ref<'a, T>(params: *const T) -> Result<&'a T> {
    if params.is_null() {
        return Err(Error::invalid("params: NULL pointer"));
    }
    Ok(unsafe { &*params })
}

fn scoring(code: i32) -> Result<Scoring> {
    match code {
        SPARKINFER_SCORING_SOFTMAX => Ok(Scoring::Softmax),
        SPARKINFER_SCORING_SIGMOID => Ok(Scoring::Sigmoid),
        other => Err(Error::invalid(format!("scoring: unknown value {other}"))),
    }
}

fn activation(code: i32) -> Result<Activation> {
    match code {
        SPARKINFER_ACTIVATION_SILU => Ok(Activation::Silu),
        SPARKINFER_ACTIVATION_GELU_TANH => Ok(Activation::GeluTanh),
        other => Err(Error::invalid(format!("activation: unknown value {other}"))),
    }
}

fn dense(gate_up: *const c_void, down: *const c_void, inter: i64, gate: *const c_void) -> Option<DenseFfn> {
    (!gate_up.is_null()).then_some(DenseFfn {
        gate_up: gate_up as u64,
        down: down as u64,
        inter,
        gate_weight: gate as u64,
    })
}

/// Runs the router GEMM (see sparkinfer_router_gemm_params) on `stream` (NULL on the CPU backend).
#[no_mangle]
pub extern "C" fn sparkinfer_router_gemm(
    ctx: *const sparkinfer_context,
    params: *const sparkinfer_router_gemm_params,
    stream: sparkinfer_stream,
) -> sparkinfer_status {
    guard(|| {
        let ctx = context_ref(ctx)?;
        let p = params_ref(params)?;
        let args = moe::RouterGemmArgs {
            x: p.x as u64,
            x_row_stride: p.x_row_stride,
            weight: p.weight as u64,
            input_scale: p.input_scale as u64,
            eps: p.eps,
            logits: p.logits as u64,
            logits_row_stride: p.logits_row_stride,
            tokens: p.tokens,
            hidden: p.hidden,
            experts: p.experts,
        };
        // The caller guarantees the stream and the pointers (header contract); shapes are checked inside.
        unsafe { moe::router_gemm(ctx, &args, Stream::from_raw(stream)) }
    })
}

/// Runs the top-k router (see sparkinfer_topk_router_params) on `stream` (NULL on the CPU backend).
#[no_mangle]
pub extern "C" fn sparkinfer_topk_router(
    ctx: *const sparkinfer_context,
    params: *const sparkinfer_topk_router_params,
    stream: sparkinfer_stream,
) -> sparkinfer_status {
    guard(|| {
        let ctx = context_ref(ctx)?;
        let p = params_ref(params)?;
        let args = moe::TopkArgs {
            logits: p.logits as u64,
            logits_row_stride: p.logits_row_stride,
            tokens: p.tokens,
            experts: p.experts,
            top_k: p.top_k,
            scoring: scoring(p.scoring)?,
            renormalize: p.renormalize != 0,
            expert_scale: p.expert_scale as u64,
            topk_ids: p.topk_ids as u64,
            topk_weights: p.topk_weights as u64,
            expert_counts: p.expert_counts as u64,
            expert_offsets: p.expert_offsets as u64,
            sorted_slots: p.sorted_slots as u64,
        };
        unsafe { moe::topk_router(ctx, &args, Stream::from_raw(stream)) }
    })
}

/// Bytes of workspace sparkinfer_expert_ffn needs: `top_k` and `inter` 0 without routed experts,
/// `dense_inter` 0 without a dense FFN. With r(n) = n rounded up to 256:
/// `r(tokens·top_k·inter·2) + r(tokens·dense_inter·2) + r(tokens·4) + r(R·hidden·4)`, where R is 0 for
/// tokens ≤ 32 and tokens·top_k (+ tokens with a dense FFN) above: the prefill path keeps the down
/// projection of every slot in fp32 until the top-k sum.
#[no_mangle]
pub extern "C" fn sparkinfer_expert_ffn_workspace_size(
    tokens: i64,
    hidden: i64,
    top_k: i64,
    inter: i64,
    dense_inter: i64,
    bytes: *mut usize,
) -> sparkinfer_status {
    guard(|| write_out("bytes", bytes, moe::expert_ffn_workspace_size(tokens, hidden, top_k, inter, dense_inter)?))
}

/// Runs the expert FFN (see sparkinfer_expert_ffn_params) on `stream` (NULL on the CPU backend) with a
/// workspace of at least sparkinfer_expert_ffn_workspace_size bytes, 16-byte aligned.
#[no_mangle]
pub extern "C" fn sparkinfer_expert_ffn(
    ctx: *const sparkinfer_context,
    params: *const sparkinfer_expert_ffn_params,
    workspace: *mut c_void,
    workspace_bytes: usize,
    stream: sparkinfer_stream,
) -> sparkinfer_status {
    guard(|| {
        let ctx = context_ref(ctx)?;
        let p = params_ref(params)?;
        let routed = (!p.gate_up.is_null()).then_some(RoutedExperts {
            gate_up: p.gate_up as u64,
            down: p.down as u64,
            experts: p.experts,
            inter: p.inter,
            top_k: p.top_k,
            topk_ids: p.topk_ids as u64,
            topk_weights: p.topk_weights as u64,
            expert_offsets: p.expert_offsets as u64,
            sorted_slots: p.sorted_slots as u64,
        });
        let args = ExpertFfnArgs {
            x: p.x as u64,
            x_row_stride: p.x_row_stride,
            out: p.out as u64,
            out_row_stride: p.out_row_stride,
            accumulate: p.accumulate != 0,
            tokens: p.tokens,
            hidden: p.hidden,
            activation: activation(p.activation)?,
            routed,
            dense: dense(p.dense_gate_up, p.dense_down, p.dense_inter, p.dense_gate_weight),
            workspace: workspace as u64,
            workspace_bytes,
        };
        unsafe { moe::expert_ffn(ctx, &args, Stream::from_raw(stream)) }
    })
}

/// Bytes of workspace sparkinfer_moe_forward needs (`dense_inter` 0 without a dense FFN). With r(n) = n
/// rounded up to 256 and S = tokens·top_k: `r(tokens·experts·4) + 3·r(S·4) + r(experts·4) +
/// r((experts+1)·4) + r(S·inter·2) + r(tokens·dense_inter·2) + r(tokens·4) + r(R·hidden·4)`, where R is
/// 0 for tokens ≤ 32 and S (+ tokens with a dense FFN) above.
#[no_mangle]
pub extern "C" fn sparkinfer_moe_forward_workspace_size(
    tokens: i64,
    hidden: i64,
    experts: i64,
    top_k: i64,
    inter: i64,
    dense_inter: i64,
    bytes: *mut usize,
) -> sparkinfer_status {
    guard(|| {
        write_out("bytes", bytes, moe::moe_forward_workspace_size(tokens, hidden, experts, top_k, inter, dense_inter)?)
    })
}

/// Runs the MoE block (see sparkinfer_moe_forward_params) on `stream` (NULL on the CPU backend) with a
/// workspace of at least sparkinfer_moe_forward_workspace_size bytes, 16-byte aligned.
#[no_mangle]
pub extern "C" fn sparkinfer_moe_forward(
    ctx: *const sparkinfer_context,
    params: *const sparkinfer_moe_forward_params,
    workspace: *mut c_void,
    workspace_bytes: usize,
    stream: sparkinfer_stream,
) -> sparkinfer_status {
    guard(|| {
        let ctx = context_ref(ctx)?;
        let p = params_ref(params)?;
        let args = MoeForwardArgs {
            ffn: ExpertFfnArgs {
                x: p.x as u64,
                x_row_stride: p.x_row_stride,
                out: p.out as u64,
                out_row_stride: p.out_row_stride,
                accumulate: p.accumulate != 0,
                tokens: p.tokens,
                hidden: p.hidden,
                activation: activation(p.activation)?,
                routed: Some(RoutedExperts {
                    gate_up: p.gate_up as u64,
                    down: p.down as u64,
                    experts: p.experts,
                    inter: p.inter,
                    top_k: p.top_k,
                    topk_ids: 0,
                    topk_weights: 0,
                    expert_offsets: 0,
                    sorted_slots: 0,
                }),
                dense: dense(p.dense_gate_up, p.dense_down, p.dense_inter, p.dense_gate_weight),
                workspace: workspace as u64,
                workspace_bytes,
            },
            router_weight: p.router_weight as u64,
            router_input_scale: p.router_input_scale as u64,
            router_eps: p.router_eps,
            scoring: scoring(p.scoring)?,
            renormalize: p.renormalize != 0,
            expert_scale: p.expert_scale as u64,
        };
        unsafe { moe::moe_forward(ctx, &args, Stream::from_raw(stream)) }
    })
}
