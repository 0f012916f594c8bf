"""Decode attention: sparkinfer against PyTorch scaled_dot_product_attention on the same tensors, in one process.

sparkinfer is called through ctypes on torch tensors (head-major caches [B, Hkv, L, D], which SDPA takes as
they are); both run on torch's current stream and are timed with CUDA events (median of many launches).
Each row also reports the relative L2 difference between the two outputs.

    python bench/compare_attention.py target/release/libsparkinfer.so

`run(lib, ctx)` returns [(name, ours_us, torch_us)] for a driver such as bench/compare.py.
"""

import ctypes
import math
import sys
from ctypes import POINTER, Structure, byref, c_float, c_int32, c_int64, c_size_t, c_void_p

import torch
import torch.nn.functional as F

SPARKINFER_KV_CACHE_CONTIGUOUS = 0
SPARKINFER_KV_CACHE_PAGED = 1
SPARKINFER_ATTENTION_NO_WINDOW = -1


class KvCache(Structure):
    _fields_ = [
        ("data", c_void_p),
        ("stride_seq", c_int64),
        ("stride_token", c_int64),
        ("stride_head", c_int64),
        ("elems", c_int64),
    ]


class DecodeParams(Structure):
    """sparkinfer_attention_decode_params, field for field."""

    _fields_ = [
        ("q", c_void_p),
        ("q_stride_batch", c_int64),
        ("q_stride_token", c_int64),
        ("q_stride_head", c_int64),
        ("k_cache", KvCache),
        ("v_cache", KvCache),
        ("cache_layout", c_int32),
        ("page_table", c_void_p),
        ("page_table_stride", c_int64),
        ("page_size", c_int64),
        ("num_pages", c_int64),
        ("seq_lens", c_void_p),
        ("out", c_void_p),
        ("out_stride_batch", c_int64),
        ("out_stride_token", c_int64),
        ("out_stride_head", c_int64),
        ("lse", c_void_p),
        ("workspace", c_void_p),
        ("workspace_bytes", c_size_t),
        ("batch", c_int64),
        ("q_len", c_int64),
        ("num_q_heads", c_int64),
        ("num_kv_heads", c_int64),
        ("head_dim", c_int64),
        ("max_seq_len", c_int64),
        ("window", c_int64),
        ("causal", c_int32),
        ("scale", c_float),
        ("softcap", c_float),
    ]


def _declare(lib):
    lib.sparkinfer_attention_decode.argtypes = [c_void_p, POINTER(DecodeParams), c_void_p]
    lib.sparkinfer_attention_decode_workspace_size.argtypes = [c_void_p, POINTER(DecodeParams), POINTER(c_size_t)]
    lib.sparkinfer_last_error.restype = ctypes.c_char_p
    lib.sparkinfer_context_create.argtypes = [c_int32, POINTER(c_void_p)]


def _check(lib, status, what):
    if status != 0:
        raise RuntimeError(f"{what}: status {status}: {lib.sparkinfer_last_error().decode()}")


def _time_us(fn, iters=200, warmup=20):
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    stops = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, stops):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) * 1000.0 for s, e in zip(starts, stops))
    return times[len(times) // 2]


def _case(lib, ctx, name, lens, hq, hkv, d, scale, window=None, page_size=None):
    dev = torch.device("cuda")
    b, l_max = len(lens), max(lens)
    q = torch.randn(b, 1, hq, d, device=dev, dtype=torch.bfloat16)
    # Logits of a few units whatever the scale, as q/k norms make them in the models.
    q *= 2.0 / (scale * math.sqrt(d))
    k = torch.randn(b, hkv, l_max, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(b, hkv, l_max, d, device=dev, dtype=torch.bfloat16)
    out = torch.empty(b, 1, hq, d, device=dev, dtype=torch.bfloat16)
    seq_lens = torch.tensor(lens, device=dev, dtype=torch.int32)

    p = DecodeParams()
    p.q = q.data_ptr()
    p.out = out.data_ptr()
    p.seq_lens = seq_lens.data_ptr()
    p.batch, p.q_len, p.num_q_heads, p.num_kv_heads, p.head_dim = b, 1, hq, hkv, d
    p.max_seq_len = l_max
    p.window = window if window else SPARKINFER_ATTENTION_NO_WINDOW
    p.causal = 1
    p.scale = scale
    keep = []
    if page_size is None:
        for field, t in (("k_cache", k), ("v_cache", v)):
            setattr(p, field, KvCache(t.data_ptr(), hkv * l_max * d, d, l_max * d, t.numel()))
        p.cache_layout = SPARKINFER_KV_CACHE_CONTIGUOUS
    else:
        # The same data copied into shuffled pages [num_pages, page_size, Hkv, D].
        pages_per_seq = (l_max + page_size - 1) // page_size
        num_pages = b * pages_per_seq
        order = torch.randperm(num_pages, device=dev)
        table = order.to(torch.int32).reshape(b, pages_per_seq).contiguous()
        for field, t in (("k_cache", k), ("v_cache", v)):
            padded = torch.zeros(b, hkv, pages_per_seq * page_size, d, device=dev, dtype=torch.bfloat16)
            padded[:, :, :l_max] = t
            logical = padded.reshape(b, hkv, pages_per_seq, page_size, d).permute(0, 2, 3, 1, 4)
            paged = torch.empty(num_pages, page_size, hkv, d, device=dev, dtype=torch.bfloat16)
            paged[order] = logical.reshape(num_pages, page_size, hkv, d)
            keep.append(paged)
            setattr(p, field, KvCache(paged.data_ptr(), page_size * hkv * d, hkv * d, d, paged.numel()))
        keep.append(table)
        p.cache_layout = SPARKINFER_KV_CACHE_PAGED
        p.page_table = table.data_ptr()
        p.page_size = page_size
        p.num_pages = num_pages

    ws_bytes = c_size_t(0)
    _check(lib, lib.sparkinfer_attention_decode_workspace_size(ctx, byref(p), byref(ws_bytes)), name)
    workspace = torch.empty(max(ws_bytes.value, 16), device=dev, dtype=torch.uint8)
    p.workspace = workspace.data_ptr()
    p.workspace_bytes = ws_bytes.value
    stream = c_void_p(torch.cuda.current_stream().cuda_stream)

    def ours():
        _check(lib, lib.sparkinfer_attention_decode(ctx, byref(p), stream), name)

    # PyTorch: the window as a slice of the last keys; unequal lengths as a boolean mask.
    qt = q.transpose(1, 2)
    if window:
        kt, vt = k[:, :, -min(window, l_max):], v[:, :, -min(window, l_max):]
    else:
        kt, vt = k, v
    mask = None
    if len(set(lens)) > 1:
        mask = (torch.arange(kt.shape[2], device=dev)[None, :] < seq_lens[:, None])[:, None, None, :]
    try:
        F.scaled_dot_product_attention(qt[:, :, :, :], kt, vt, attn_mask=mask, scale=scale, enable_gqa=True)
        kw = {"enable_gqa": True}
    except TypeError:  # torch < 2.5: expand the KV heads beforehand (not timed)
        kt = kt.repeat_interleave(hq // hkv, dim=1)
        vt = vt.repeat_interleave(hq // hkv, dim=1)
        kw = {}

    def theirs():
        return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, **kw)

    ours()
    want = theirs().transpose(1, 2).float()
    torch.cuda.synchronize()
    err = ((out.float() - want).norm() / want.norm()).item()
    ours_us = _time_us(ours)
    torch_us = _time_us(theirs)
    return name, ours_us, torch_us, err


QWEN = (16, 2, 256, 1.0 / 16)
GEMMA_LOCAL = (16, 8, 256, 1.0)
GEMMA_GLOBAL = (16, 2, 512, 1.0)
GENERIC = (32, 8, 128, 128 ** -0.5)


def cases():
    out = []
    for ctx in (32768, 4096):
        out.append((f"qwen3.5 16/2 hd256 ctx {ctx}", [ctx], QWEN, {}))
        out.append((f"gemma4 global 16/2 hd512 ctx {ctx}", [ctx], GEMMA_GLOBAL, {}))
        out.append((f"generic 32/8 hd128 ctx {ctx}", [ctx], GENERIC, {}))
    out.append(("gemma4 local w1024 ctx 32768", [32768], GEMMA_LOCAL, {"window": 1024}))
    out.append(("qwen3.5 B=16 ctx 1K-32K", [1024 + i * 31 * 1024 // 15 for i in range(16)], QWEN, {}))
    out.append(("qwen3.5 B=64 ctx 4096", [4096] * 64, QWEN, {}))
    out.append(("qwen3.5 ctx 32768 paged 64", [32768], QWEN, {"page_size": 64}))
    return out


def _prefill_case(lib, ctx, t=2048):
    """Causal prefill of a T-token chunk that is the whole sequence, Qwen3.5 shape, against flash SDPA."""
    hq, hkv, d, scale = QWEN
    dev = torch.device("cuda")
    q = torch.randn(1, t, hq, d, device=dev, dtype=torch.bfloat16) * (2.0 / (scale * math.sqrt(d)))
    k = torch.randn(1, hkv, t, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, hkv, t, d, device=dev, dtype=torch.bfloat16)
    out = torch.empty(1, t, hq, d, device=dev, dtype=torch.bfloat16)
    seq_lens = torch.tensor([t], device=dev, dtype=torch.int32)
    p = DecodeParams()
    p.q, p.out, p.seq_lens = q.data_ptr(), out.data_ptr(), seq_lens.data_ptr()
    p.k_cache = KvCache(k.data_ptr(), hkv * t * d, d, t * d, k.numel())
    p.v_cache = KvCache(v.data_ptr(), hkv * t * d, d, t * d, v.numel())
    p.cache_layout = SPARKINFER_KV_CACHE_CONTIGUOUS
    p.batch, p.q_len, p.num_q_heads, p.num_kv_heads, p.head_dim, p.max_seq_len = 1, t, hq, hkv, d, t
    p.window, p.causal, p.scale = SPARKINFER_ATTENTION_NO_WINDOW, 1, scale
    stream = c_void_p(torch.cuda.current_stream().cuda_stream)
    lib.sparkinfer_attention_prefill.argtypes = [c_void_p, POINTER(DecodeParams), c_void_p]

    def ours():
        _check(lib, lib.sparkinfer_attention_prefill(ctx, byref(p), stream), "prefill")

    qt = q.transpose(1, 2)
    kt = k.repeat_interleave(hq // hkv, dim=1)
    vt = v.repeat_interleave(hq // hkv, dim=1)

    def theirs():
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale)

    ours()
    want = theirs().transpose(1, 2).float()
    torch.cuda.synchronize()
    err = ((out.float() - want).norm() / want.norm()).item()
    ours_us, torch_us = _time_us(ours, iters=50), _time_us(theirs, iters=50)
    flops = 2.0 * t * t * d * hq
    name = f"prefill qwen3.5 T={t} causal"
    print(f"  {name:<36} output rel diff vs torch {err:.2e}; TFLOP/s ours {flops / ours_us / 1e6:.1f}, "
          f"torch {flops / torch_us / 1e6:.1f}", file=sys.stderr)
    return name, ours_us, torch_us


def run(lib, ctx):
    """[(name, ours_us, torch_us)] for every case; also prints the output difference of each."""
    _declare(lib)
    rows = []
    for name, lens, (hq, hkv, d, scale), extra in cases():
        name, ours_us, torch_us, err = _case(lib, ctx, name, lens, hq, hkv, d, scale, **extra)
        print(f"  {name:<36} output rel diff vs torch {err:.2e}", file=sys.stderr)
        rows.append((name, ours_us, torch_us))
    rows.append(_prefill_case(lib, ctx))
    return rows


def main():
    lib = ctypes.CDLL(sys.argv[1] if len(sys.argv) > 1 else "libsparkinfer.so")
    _declare(lib)
    ctx = c_void_p()
    torch.cuda.init()
    _check(lib, lib.sparkinfer_context_create(0, byref(ctx)), "sparkinfer_context_create")
    print(f"{'case':<36} {'sparkinfer us':>14} {'torch us':>10} {'speed-up':>9}")
    for name, ours_us, torch_us in run(lib, ctx):
        print(f"{name:<36} {ours_us:>14.1f} {torch_us:>10.1f} {torch_us / ours_us:>8.2f}x")


if __name__ == "__main__":
    main()
