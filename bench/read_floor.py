#!/usr/bin/env python3
"""What a kernel that only reads a buffer achieves on this GPU: the reference against which the decode
attention rows' time for the same bytes is judged (docs/PERF.md).

A Triton kernel sums a bf16 buffer (each program a contiguous chunk, loads evict-first) over a grid of
configurations; torch.sum and a device-to-device copy run beside it. Each case is timed as compare.py
times a row (time_us: calls captured into a CUDA graph, replays timed with CUDA events), the calls
rotating over enough copies of the buffer that the working set is at least four times the L2. Rows give
the three best Triton configurations' and torch.sum's time per call and read rate. The copy line it
compares against is a graph-captured device copy, which measures lower than the lone copies of
`sparkinfer bench` (2448 against 3024 GB/s on the H100, measured before this script used time_us):
compare with the bench's figure where a row is judged against a target.

    python3 bench/read_floor.py --mb 67.1 8.4
"""
import argparse

import torch
import triton
import triton.language as tl

from compare import time_us


@triton.jit
def read_sum(x_ptr, out_ptr, n, per_program, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    start = pid * per_program
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(start, start + per_program, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + idx, mask=idx < n, other=0.0, eviction_policy="evict_first").to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, nargs="+", default=[67.1, 8.4], help="buffer sizes in MB (1e6 bytes)")
    args = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    l2 = torch.cuda.get_device_properties(0).L2_cache_size

    big = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda")
    big_out = torch.empty_like(big)
    copy_us = time_us(lambda i: big_out.copy_(big), 1, launches=20)
    copy_gbs = 2 * big.numel() * 2 / copy_us / 1e3
    print(f"{torch.cuda.get_device_name(0)}, {sms} SMs; device copy of 1 GiB: {copy_us:.1f} µs, {copy_gbs:.0f} GB/s")
    del big, big_out

    for mb in args.mb:
        n = int(mb * 1e6) // 2
        n -= n % 8192
        copies = max(2, -(-4 * l2 // (n * 2)))
        xs = [torch.randn(n, device="cuda").to(torch.bfloat16) for _ in range(copies)]
        results = []
        for programs in (sms, 2 * sms, 4 * sms, 8 * sms):
            for block, warps in ((2048, 4), (4096, 4), (4096, 8), (8192, 8)):
                per = -(-n // programs)
                per = -(-per // block) * block
                grid = -(-n // per)
                out = torch.empty(grid, dtype=torch.float32, device="cuda")
                us = time_us(
                    lambda i: read_sum[(grid,)](xs[i], out, n, per, BLOCK=block, num_warps=warps),
                    copies, launches=30 * copies)
                results.append((us, f"triton {grid} programs, block {block}, {warps} warps"))
        results.sort()
        results = results[:3] + [(time_us(lambda i: xs[i].sum(), copies, launches=30 * copies), "torch.sum")]
        for us, what in results:
            gbs = n * 2 / us / 1e3
            pct = 100 * gbs / copy_gbs
            print(f"{n * 2 / 1e6:7.1f} MB  {us:7.2f} µs  {gbs:6.0f} GB/s  {pct:5.1f}% of copy  {what}")
        del xs


if __name__ == "__main__":
    main()
