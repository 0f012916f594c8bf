//! C API of decode attention: one params struct, the op and its workspace query.

use super::context::{context_ref, sparkinfer_context, sparkinfer_stream};
use super::{guard, sparkinfer_status, write_out};
use crate::error::{Error, Result};
use crate::ops::attention::{self, CacheLayout, CacheTensor, DecodeArgs};
use crate::ops::Stream;
use std::ffi::c_void;

/// K/V cache addressed per sequence: token j of sequence b, KV head h at
/// `b·stride_seq + j·stride_token + h·stride_head` (elements).
pub const SPARKINFER_KV_CACHE_CONTIGUOUS: i32 = 0;
/// K/V cache in pages: token j of sequence b in page `page_table[b·page_table_stride + j / page_size]`,
/// at `page·stride_seq + (j mod page_size)·stride_token + h·stride_head` (elements).
pub const SPARKINFER_KV_CACHE_PAGED: i32 = 1;
/// `window` value for full attention (no sliding window).
pub const SPARKINFER_ATTENTION_NO_WINDOW: i64 = -1;

/// One bf16 cache (K or V). Strides in elements, each a positive multiple of 8; `data` 16-byte aligned.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct sparkinfer_kv_cache {
    pub data: *const c_void,
    /// Between sequences (contiguous) or between pages (paged).
    pub stride_seq: i64,
    pub stride_token: i64,
    pub stride_head: i64,
    /// bf16 elements the caller owns from `data`; every address the strides can form must lie below it
    /// (for max_seq_len tokens per sequence, or num_pages pages).
    pub elems: i64,
}

/// Decode attention ("flash decode") of `q_len` new tokens per sequence against a bf16 KV cache:
///
/// `out[b, t, h] = Σ_j softmax_j(s_j) · v[b, j, h / group]`, `s_j = softcap(scale · q[b, t, h] · k[b, j, h / group])`
///
/// with group = num_q_heads / num_kv_heads. The new tokens are already in the cache: token t of sequence b
/// sits at position `p = seq_lens[b] − q_len + t`, and key j is visible iff `j < seq_lens[b]`,
/// (causal == 0 or j ≤ p) and (no window or j > p − window). A row with no visible key (length 0, or
/// fewer tokens than q_len under causal masking) gets a zero output and lse = −∞, never NaN.
///
/// `seq_lens` lives in device memory and is read by the kernel (clamped to [0, max_seq_len]), so a CUDA
/// graph captured once stays correct as the lengths change; `max_seq_len` is the host-known bound that
/// sizes the launch (the split of the key range over CTAs) and the workspace. Long contexts are split
/// over CTAs whose partial results go to `workspace` and are merged by log-sum-exp; query its size with
/// sparkinfer_attention_decode_workspace_size for the same params (0 bytes when one split suffices and on
/// the CPU backend).
///
/// Supported: head_dim 64, 128, 256, 512 (K and V share it); group 1, 2, 4, 8, 16; q_len 1 to 8; page
/// sizes 16 to 256 (powers of two). Activation strides are in elements, 0 meaning dense; all strides
/// multiples of 8; q, out, caches and workspace 16-byte aligned.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct sparkinfer_attention_decode_params {
    /// bf16 [batch, q_len, num_q_heads, head_dim].
    pub q: *const c_void,
    pub q_stride_batch: i64,
    pub q_stride_token: i64,
    pub q_stride_head: i64,
    pub k_cache: sparkinfer_kv_cache,
    pub v_cache: sparkinfer_kv_cache,
    /// SPARKINFER_KV_CACHE_CONTIGUOUS or SPARKINFER_KV_CACHE_PAGED.
    pub cache_layout: i32,
    /// Paged only: int32 [batch, page_table_stride] page ids in [0, num_pages), device memory. An id
    /// outside that range is an error the op does not check (the ids stay on the GPU), but no memory
    /// outside the cache is read for it: its keys and values read as zeros, in decode and prefill on
    /// either backend. The ids of pages wholly before every new token's window may be anything.
    pub page_table: *const i32,
    /// Paged only: elements between the rows of page_table; 0 means ceil(max_seq_len / page_size).
    pub page_table_stride: i64,
    /// Paged only: tokens per page, a power of two from 16 to 256.
    pub page_size: i64,
    /// Paged only: pages in each cache.
    pub num_pages: i64,
    /// int32 [batch] tokens in the cache per sequence, the q_len new ones included (device memory).
    pub seq_lens: *const i32,
    /// bf16 [batch, q_len, num_q_heads, head_dim].
    pub out: *mut c_void,
    pub out_stride_batch: i64,
    pub out_stride_token: i64,
    pub out_stride_head: i64,
    /// Optional fp32 [batch, q_len, num_q_heads] (dense): natural-log sum of exp of the scaled, softcapped
    /// logits of each row. NULL for none.
    pub lse: *mut f32,
    /// Scratch of at least sparkinfer_attention_decode_workspace_size bytes, 16-byte aligned; may be NULL
    /// when that size is 0. Its contents need not survive between calls. The split partials are stored
    /// there evict-last in L2, so that they stay for their merge; layers that share one workspace keep that
    /// share of L2 to one workspace's size.
    pub workspace: *mut c_void,
    pub workspace_bytes: usize,
    pub batch: i64,
    /// New query tokens per sequence, 1 to 8.
    pub q_len: i64,
    pub num_q_heads: i64,
    pub num_kv_heads: i64,
    pub head_dim: i64,
    /// Bound on every seq_lens value (at most 2^28); for a contiguous cache, the tokens it holds per
    /// sequence.
    pub max_seq_len: i64,
    /// Attend only the last `window` positions up to each query's own (Gemma 4 local: 1024), or
    /// SPARKINFER_ATTENTION_NO_WINDOW. 0 is invalid.
    pub window: i64,
    /// 1: mask keys after each query's position (needed when q_len > 1); 0: the new tokens see each other.
    pub causal: i32,
    /// Logit scale (Qwen3.5: 1/16, Gemma 4: 1.0).
    pub scale: f32,
    /// Logit softcap `cap · tanh(s / cap)`; 0 for none.
    pub softcap: f32,
}

fn params_ref<'a>(params: *const sparkinfer_attention_decode_params) -> Result<&'a sparkinfer_attention_decode_params> {
    if params.is_null() {
        return Err(Error::invalid("params: NULL pointer"));
    }
    Ok(unsafe { &*params })
}

fn cache(c: &sparkinfer_kv_cache) -> CacheTensor {
    CacheTensor {
        ptr: c.data as u64,
        stride_seq: c.stride_seq,
        stride_token: c.stride_token,
        stride_head: c.stride_head,
        elems: c.elems,
    }
}

fn decode_args(p: &sparkinfer_attention_decode_params) -> Result<DecodeArgs> {
    let layout = match p.cache_layout {
        SPARKINFER_KV_CACHE_CONTIGUOUS => CacheLayout::Contiguous,
        SPARKINFER_KV_CACHE_PAGED => CacheLayout::Paged {
            page_table: p.page_table as u64,
            page_table_stride: p.page_table_stride,
            page_size: p.page_size,
            num_pages: p.num_pages,
        },
        other => return Err(Error::invalid(format!("cache_layout: unknown value {other}"))),
    };
    let window = match p.window {
        SPARKINFER_ATTENTION_NO_WINDOW => None,
        w if w > 0 => Some(w),
        w => {
            return Err(Error::invalid(format!(
                "window: {w} is invalid; give a positive window or SPARKINFER_ATTENTION_NO_WINDOW (-1)"
            )))
        }
    };
    let causal = match p.causal {
        0 => false,
        1 => true,
        other => return Err(Error::invalid(format!("causal: {other} is neither 0 nor 1"))),
    };
    let softcap = if p.softcap == 0.0 { None } else { Some(p.softcap) };
    Ok(DecodeArgs {
        q: p.q as u64,
        q_strides: [p.q_stride_batch, p.q_stride_token, p.q_stride_head],
        k: cache(&p.k_cache),
        v: cache(&p.v_cache),
        layout,
        seq_lens: p.seq_lens as u64,
        out: p.out as u64,
        out_strides: [p.out_stride_batch, p.out_stride_token, p.out_stride_head],
        lse: p.lse as u64,
        workspace: p.workspace as u64,
        workspace_bytes: p.workspace_bytes as u64,
        batch: p.batch,
        q_len: p.q_len,
        num_q_heads: p.num_q_heads,
        num_kv_heads: p.num_kv_heads,
        head_dim: p.head_dim,
        max_seq_len: p.max_seq_len,
        window,
        causal,
        scale: p.scale,
        softcap,
    })
}

/// Bytes of workspace sparkinfer_attention_decode needs for `params` on `ctx` (its pointers are not
/// read, only its sizes). Depends on the device's SM count: query it per context.
#[no_mangle]
pub extern "C" fn sparkinfer_attention_decode_workspace_size(
    ctx: *const sparkinfer_context,
    params: *const sparkinfer_attention_decode_params,
    bytes: *mut usize,
) -> sparkinfer_status {
    guard(|| {
        let ctx = context_ref(ctx)?;
        let args = decode_args(params_ref(params)?)?;
        write_out("bytes", bytes, attention::decode_workspace_size(ctx, &args)?)
    })
}

/// Runs decode attention (see sparkinfer_attention_decode_params) on `stream` (NULL on the CPU backend).
#[no_mangle]
pub extern "C" fn sparkinfer_attention_decode(
    ctx: *const sparkinfer_context,
    params: *const sparkinfer_attention_decode_params,
    stream: sparkinfer_stream,
) -> sparkinfer_status {
    guard(|| {
        let ctx = context_ref(ctx)?;
        let args = decode_args(params_ref(params)?)?;
        // The caller guarantees the stream and the pointers (header contract); shapes are checked inside.
        unsafe { attention::decode(ctx, &args, Stream::from_raw(stream)) }
    })
}

/// Runs prefill attention on `stream`: the same attention as sparkinfer_attention_decode for a chunk of
/// `q_len` = 1 to 8192 new tokens per sequence (the last q_len tokens of its cache), on tensor cores.
/// Takes the decode params (every head_dim of decode: 64, 128, 256, 512); needs no workspace (the
/// workspace fields are ignored).
#[no_mangle]
pub extern "C" fn sparkinfer_attention_prefill(
    ctx: *const sparkinfer_context,
    params: *const sparkinfer_attention_decode_params,
    stream: sparkinfer_stream,
) -> sparkinfer_status {
    guard(|| {
        let ctx = context_ref(ctx)?;
        let args = decode_args(params_ref(params)?)?;
        // The caller guarantees the stream and the pointers (header contract); shapes are checked inside.
        unsafe { attention::prefill(ctx, &args, Stream::from_raw(stream)) }
    })
}
