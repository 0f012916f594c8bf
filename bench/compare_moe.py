"""The MoE block of sparkinfer against PyTorch eager on the same GPU, in the same process.

sparkinfer is called through ctypes on torch tensors, on torch's current stream. The PyTorch block is the
usual eager formulation: router logits, softmax, top-k, renormalise (Gemma 4: input transform and
per-expert scale), then gather-and-bmm over the selected experts, plus the shared expert (Qwen3.5, gated)
or the dense MLP (Gemma 4). Both are timed with CUDA events (median), and their outputs compared.

Usage: python bench/compare_moe.py [path/to/libsparkinfer.so]
As a module: run(lib, ctx) -> [(name, ours_us, torch_us)].
"""

import ctypes
import math
import os
import sys

import torch
import torch.nn.functional as F

SCORING_SOFTMAX = 0
ACTIVATION_SILU = 0
ACTIVATION_GELU_TANH = 1


class MoeForwardParams(ctypes.Structure):
    """sparkinfer_moe_forward_params, field for field (include/sparkinfer/sparkinfer.h)."""

    _fields_ = [
        ("x", ctypes.c_void_p),
        ("x_row_stride", ctypes.c_int64),
        ("out", ctypes.c_void_p),
        ("out_row_stride", ctypes.c_int64),
        ("accumulate", ctypes.c_int32),
        ("tokens", ctypes.c_int64),
        ("hidden", ctypes.c_int64),
        ("router_weight", ctypes.c_void_p),
        ("router_input_scale", ctypes.c_void_p),
        ("router_eps", ctypes.c_float),
        ("experts", ctypes.c_int64),
        ("top_k", ctypes.c_int64),
        ("scoring", ctypes.c_int32),
        ("renormalize", ctypes.c_int32),
        ("expert_scale", ctypes.c_void_p),
        ("gate_up", ctypes.c_void_p),
        ("down", ctypes.c_void_p),
        ("inter", ctypes.c_int64),
        ("activation", ctypes.c_int32),
        ("dense_gate_up", ctypes.c_void_p),
        ("dense_down", ctypes.c_void_p),
        ("dense_inter", ctypes.c_int64),
        ("dense_gate_weight", ctypes.c_void_p),
    ]


# (label, hidden, experts, top_k, inter, dense_inter, gemma): MODELS.md.
QWEN35 = ("qwen3.5", 2048, 256, 8, 512, 512, False)
GEMMA4 = ("gemma4", 2816, 128, 8, 704, 2112, True)


def declare(lib):
    lib.sparkinfer_last_error.restype = ctypes.c_char_p
    lib.sparkinfer_context_create.argtypes = [ctypes.c_int32, ctypes.POINTER(ctypes.c_void_p)]
    lib.sparkinfer_moe_forward_workspace_size.argtypes = [ctypes.c_int64] * 6 + [ctypes.POINTER(ctypes.c_size_t)]
    lib.sparkinfer_moe_forward.argtypes = [
        ctypes.c_void_p,
        ctypes.POINTER(MoeForwardParams),
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_void_p,
    ]


def check(lib, status, what):
    if status != 0:
        raise RuntimeError(f"{what}: status {status}: {lib.sparkinfer_last_error().decode()}")


class Block:
    """One model's MoE weights on the GPU."""

    def __init__(self, shape, gen):
        self.label, self.h, self.e, self.k, self.i, self.di, self.gemma = shape
        h, e, i, di = self.h, self.e, self.i, self.di
        dev = "cuda"

        def rnd(*size, std):
            return (torch.randn(*size, device=dev, generator=gen) * std).to(torch.bfloat16)

        self.router = rnd(e, h, std=4.0 / math.sqrt(h))
        self.gate_up = rnd(e, 2 * i, h, std=1.0 / math.sqrt(h))
        self.down = rnd(e, h, i, std=1.0 / math.sqrt(i))
        self.dense_gate_up = rnd(2 * di, h, std=1.0 / math.sqrt(h))
        self.dense_down = rnd(h, di, std=1.0 / math.sqrt(di))
        if self.gemma:
            self.input_scale = (1.0 + 0.5 * torch.rand(h, device=dev, generator=gen)).to(torch.bfloat16)
            self.expert_scale = 0.5 + torch.rand(e, device=dev, generator=gen)
            self.dense_gate = None
        else:
            self.input_scale = None
            self.expert_scale = None
            self.dense_gate = rnd(h, std=1.0 / math.sqrt(h))

    def act(self, g):
        return F.gelu(g, approximate="tanh") if self.gemma else F.silu(g)

    def torch_forward(self, x):
        t = x.shape[0]
        xf = x.float()
        if self.gemma:
            xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * self.input_scale.float() / math.sqrt(self.h)
        logits = xf @ self.router.float().t()
        probs = torch.softmax(logits, dim=-1)
        weights, ids = torch.topk(probs, self.k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        if self.gemma:
            weights = weights * self.expert_scale[ids]
        flat = ids.reshape(-1)
        xs = x.repeat_interleave(self.k, dim=0).unsqueeze(-1)  # [T*k, H, 1]
        gu = torch.bmm(self.gate_up[flat], xs).squeeze(-1)  # [T*k, 2I]
        mid = (self.act(gu[:, : self.i].float()) * gu[:, self.i :].float()).to(torch.bfloat16)
        y = torch.bmm(self.down[flat], mid.unsqueeze(-1)).squeeze(-1).float()  # [T*k, H]
        y = (y.view(t, self.k, self.h) * weights.unsqueeze(-1)).sum(1)
        dgu = F.linear(x, self.dense_gate_up).float()
        dmid = (self.act(dgu[:, : self.di]) * dgu[:, self.di :]).to(torch.bfloat16)
        dense = F.linear(dmid, self.dense_down).float()
        if self.dense_gate is not None:
            dense = dense * torch.sigmoid(x.float() @ self.dense_gate.float())[:, None]
        return (y + dense).to(torch.bfloat16)

    def params(self, x, out):
        p = MoeForwardParams()
        p.x, p.out = x.data_ptr(), out.data_ptr()
        p.tokens, p.hidden = x.shape[0], self.h
        p.router_weight = self.router.data_ptr()
        p.router_input_scale = self.input_scale.data_ptr() if self.gemma else None
        p.router_eps = 1e-6
        p.experts, p.top_k = self.e, self.k
        p.scoring, p.renormalize = SCORING_SOFTMAX, 1
        p.expert_scale = self.expert_scale.data_ptr() if self.gemma else None
        p.gate_up, p.down, p.inter = self.gate_up.data_ptr(), self.down.data_ptr(), self.i
        p.activation = ACTIVATION_GELU_TANH if self.gemma else ACTIVATION_SILU
        p.dense_gate_up, p.dense_down, p.dense_inter = self.dense_gate_up.data_ptr(), self.dense_down.data_ptr(), self.di
        p.dense_gate_weight = self.dense_gate.data_ptr() if self.dense_gate is not None else None
        return p


def median_us(fn, iters=100, warmup=10):
    for _ in range(warmup):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, stop in events:
        start.record()
        fn()
        stop.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(stop) * 1000.0 for start, stop in events)
    return times[len(times) // 2]


def run(lib, ctx):
    """Times the block at T = 1, 8, 64 for both models; returns [(name, ours_us, torch_us)]."""
    declare(lib)
    gen = torch.Generator(device="cuda")
    gen.manual_seed(0)
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    rows = []
    for shape in (QWEN35, GEMMA4):
        block = Block(shape, gen)
        for tokens in (1, 8, 64):
            # Several inputs in rotation, so that routing (and the experts read) changes between calls.
            xs = [torch.randn(tokens, block.h, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(16)]
            out = torch.empty(tokens, block.h, device="cuda", dtype=torch.bfloat16)
            size = ctypes.c_size_t()
            check(lib, lib.sparkinfer_moe_forward_workspace_size(tokens, block.h, block.e, block.k, block.i, block.di,
                                                                 ctypes.byref(size)), "workspace size")
            workspace = torch.empty(size.value, device="cuda", dtype=torch.uint8)
            params = [block.params(x, out) for x in xs]
            state = {"n": 0}

            def ours():
                p = params[state["n"] % len(params)]
                state["n"] += 1
                check(lib, lib.sparkinfer_moe_forward(ctx, ctypes.byref(p), workspace.data_ptr(), size.value, stream),
                      "sparkinfer_moe_forward")

            def theirs():
                block.torch_forward(xs[state["n"] % len(xs)])
                state["n"] += 1

            state["n"] = 0
            ours()
            torch.cuda.synchronize()
            want = block.torch_forward(xs[0])
            err = ((out.float() - want.float()).norm() / want.float().norm()).item()
            if not err <= 2e-2:
                raise RuntimeError(f"{block.label} T={tokens}: sparkinfer and PyTorch differ, rel err {err:.3e}")
            ours_us = median_us(ours)
            torch_us = median_us(theirs)
            rows.append((f"moe_block {block.label} T={tokens}", ours_us, torch_us))
        del block
        torch.cuda.empty_cache()
    return rows


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("SPARKINFER_LIB", "target/release/libsparkinfer.so")
    lib = ctypes.CDLL(path)
    ctx = ctypes.c_void_p()
    torch.cuda.init()
    torch.zeros(1, device="cuda")  # make the primary context current before the library binds it
    declare(lib)
    check(lib, lib.sparkinfer_context_create(0, ctypes.byref(ctx)), "sparkinfer_context_create")
    print(f"{'block':<28} {'sparkinfer us':>14} {'torch us':>10} {'speed-up':>9}")
    for name, ours, theirs in run(lib, ctx):
        print(f"{name:<28} {ours:>14.1f} {theirs:>10.1f} {theirs / ours:>8.1f}x")


if __name__ == "__main__":
    main()
