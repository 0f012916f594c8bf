#!/usr/bin/env python3
"""Side-by-side timings of sparkinfer and PyTorch on the same tensors in the same process.

sparkinfer is called through ctypes on torch tensors (their data pointers and torch's current stream);
both sides are captured into CUDA graphs (as an engine runs its decode step) and timed by replaying them
with CUDA events, inputs rotated through enough copies that the working set exceeds twice the L2. Prints one row per case and the ratio
torch_us / sparkinfer_us (> 1 means sparkinfer is faster).

    python3 bench/compare.py --lib target/release/libsparkinfer.so
"""
import argparse
import ctypes
import importlib
import os
import statistics
import sys

import torch

SUCCESS = 0
DTYPE_BF16, DTYPE_F32 = 0, 1
GEMV_WEIGHTS_STATIC = 1
WEIGHT_STYLE_OFFSET_ONE = 1


class RmsNormParams(ctypes.Structure):
    _fields_ = [
        ("x", ctypes.c_void_p), ("x_row_stride", ctypes.c_int64),
        ("residual", ctypes.c_void_p), ("residual_row_stride", ctypes.c_int64),
        ("weight", ctypes.c_void_p),
        ("out", ctypes.c_void_p), ("out_row_stride", ctypes.c_int64),
        ("rows", ctypes.c_int64), ("dim", ctypes.c_int64),
        ("eps", ctypes.c_float), ("weight_style", ctypes.c_int32),
    ]


class GemvParams(ctypes.Structure):
    _fields_ = [
        ("x", ctypes.c_void_p), ("x_row_stride", ctypes.c_int64),
        ("w", ctypes.c_void_p), ("w_row_stride", ctypes.c_int64),
        ("y", ctypes.c_void_p), ("y_row_stride", ctypes.c_int64),
        ("m", ctypes.c_int64), ("n", ctypes.c_int64), ("k", ctypes.c_int64),
        ("y_dtype", ctypes.c_int32), ("flags", ctypes.c_int32),
    ]


def load(path):
    lib = ctypes.CDLL(path)
    lib.sparkinfer_last_error.restype = ctypes.c_char_p
    lib.sparkinfer_status_string.restype = ctypes.c_char_p
    lib.sparkinfer_context_create.argtypes = [ctypes.c_int32, ctypes.POINTER(ctypes.c_void_p)]
    lib.sparkinfer_rmsnorm.argtypes = [ctypes.c_void_p, ctypes.POINTER(RmsNormParams), ctypes.c_void_p]
    lib.sparkinfer_gemv.argtypes = [ctypes.c_void_p, ctypes.POINTER(GemvParams), ctypes.c_void_p]
    return lib


def check(lib, status, what):
    if status != SUCCESS:
        raise RuntimeError(f"{what}: {lib.sparkinfer_status_string(status).decode()}: {lib.sparkinfer_last_error().decode()}")


def copies_for(set_bytes):
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(1, -(-2 * l2 // max(set_bytes, 1))) + 1


def time_us(fn, copies, launches=100, replays=7):
    """Device time per call as it runs inside a decode graph: fn(i) (input copy i % copies) is called
    `launches` times under torch.cuda.graph capture, the graph is replayed, and the median replay time
    (CUDA events) is divided by `launches`. Python's per-call host time, which would otherwise set the
    pace for both sides, stays out of the figure. Warm-up calls run first, outside the capture."""
    for i in range(3):
        fn(i % copies)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(launches):
            fn(i % copies)
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / launches)
    return statistics.median(times)


def stream_ptr():
    return ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)


def gemv_case(lib, ctx, m, n, k, flags=0):
    set_bytes = (n * k + m * k + m * n) * 2
    copies = copies_for(set_bytes)
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for _ in range(copies)]
    xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    ys = [torch.empty(m, n, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    params = [GemvParams(xs[i].data_ptr(), 0, ws[i].data_ptr(), 0, ys[i].data_ptr(), 0, m, n, k, DTYPE_BF16, flags)
              for i in range(copies)]

    def ours(i):
        check(lib, lib.sparkinfer_gemv(ctx, ctypes.byref(params[i]), stream_ptr()), "sparkinfer_gemv")

    def theirs(i):
        torch.matmul(xs[i], ws[i].t(), out=ys[i])

    ours(0)
    torch.cuda.synchronize()
    want = (xs[0].float() @ ws[0].float().t())
    err = ((ys[0].float() - want).norm() / want.norm()).item()
    if not err <= 1e-2:
        raise RuntimeError(f"gemv {m}x{n}x{k}: relative error {err}")
    name = f"gemv M={m} {n}x{k}" + (" static-W" if flags & GEMV_WEIGHTS_STATIC else "")
    return name, time_us(ours, copies), time_us(theirs, copies)


def rmsnorm_case(lib, ctx, rows, dim):
    set_bytes = rows * dim * 2 * 4 + dim * 2
    copies = copies_for(set_bytes)
    xs = [torch.randn(rows, dim, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    rs = [torch.randn(rows, dim, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    outs = [torch.empty(rows, dim, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    w = torch.randn(dim, device="cuda", dtype=torch.bfloat16) * 0.1
    w1 = (w.float() + 1.0).to(torch.bfloat16)
    params = [RmsNormParams(xs[i].data_ptr(), 0, rs[i].data_ptr(), 0, w.data_ptr(), outs[i].data_ptr(), 0,
                            rows, dim, 1e-6, WEIGHT_STYLE_OFFSET_ONE) for i in range(copies)]

    def ours(i):
        check(lib, lib.sparkinfer_rmsnorm(ctx, ctypes.byref(params[i]), stream_ptr()), "sparkinfer_rmsnorm")

    def theirs(i):
        rs[i].add_(xs[i])
        torch.nn.functional.rms_norm(rs[i], (dim,), w1, 1e-6)

    return f"rmsnorm {rows}x{dim} +residual", time_us(ours, copies), time_us(theirs, copies)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", default="target/release/libsparkinfer.so")
    args = ap.parse_args()
    lib = load(os.path.abspath(args.lib))
    ctx = ctypes.c_void_p()
    check(lib, lib.sparkinfer_context_create(0, ctypes.byref(ctx)), "sparkinfer_context_create")
    torch.manual_seed(0)
    rows = []
    for m, n, k in [(1, 2048, 2048), (1, 8192, 2048), (1, 31040, 2048), (4, 8192, 2048)]:
        rows.append(gemv_case(lib, ctx, m, n, k))
    for m, n, k in [(1, 2048, 2048), (1, 8192, 2048), (1, 31040, 2048)]:
        rows.append(gemv_case(lib, ctx, m, n, k, GEMV_WEIGHTS_STATIC))
    for r, d in [(1, 2048), (64, 2048)]:
        rows.append(rmsnorm_case(lib, ctx, r, d))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    for family in ("compare_attention", "compare_moe"):
        try:
            module = importlib.import_module(family)
        except ModuleNotFoundError:
            continue
        rows.extend(module.run(lib, ctx))
    print(f"PyTorch {torch.__version__} on {torch.cuda.get_device_name(0)}")
    print(f"{'case':<44} {'sparkinfer us':>14} {'torch us':>10} {'torch/ours':>11}")
    for name, ours, theirs in rows:
        print(f"{name:<44} {ours:>14.2f} {theirs:>10.2f} {theirs / ours:>11.2f}")
    lib.sparkinfer_context_destroy(ctx)


if __name__ == "__main__":
    main()
