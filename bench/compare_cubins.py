#!/usr/bin/env python3
"""Compares the machine code of the attention kernels between two source trees.

Compiles csrc/cuda/attention/decode.cu of each tree with NVRTC (the options of src/runtime/jit.rs) for each
architecture and reports, per kernel, whether its .text section is byte-identical. A change that must leave
the default kernels as they were (a new template variant, a new kernel beside them) is checked this way
before any device time is spent on it.

  SPARKINFER_NVRTC_LIBRARY=.../libnvrtc.so.13 python3 bench/compare_cubins.py OLD_TREE NEW_TREE [ARCH ...]

ARCH defaults to sm_90 sm_120 sm_121 sm_110. The NVRTC builtins library must sit beside libnvrtc (the PyPI
wheel's layout); its folder is put on the loader's path here. Exits 1 if any kernel differs.
"""
import ctypes
import os
import struct
import sys

KERNELS = [
    "flash_decode_mma_kernel<64>",
    "flash_decode_mma_kernel<128>",
    "flash_decode_mma_kernel<256>",
    "flash_decode_mma_kernel<512>",
    "flash_decode_mma_kernel<256, true>",
    "attention_combine_kernel<64>",
    "attention_combine_kernel<256>",
    "attention_combine_kernel<512>",
    "attention_combine_rows_kernel<256>",
    "attention_prefill_kernel<128>",
    "attention_prefill_kernel<256>",
    "attention_prefill_kernel<512>",
]


def nvrtc():
    path = os.environ.get("SPARKINFER_NVRTC_LIBRARY")
    if not path:
        sys.exit("set SPARKINFER_NVRTC_LIBRARY to libnvrtc.so.13")
    # libnvrtc loads its builtins by name.
    ctypes.CDLL(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so.13.0"), mode=ctypes.RTLD_GLOBAL)
    return ctypes.CDLL(path)


def compile_tree(lib, root, arch):
    """The cubin of the tree's decode.cu for `arch`, and each kernel's lowered name."""
    src = open(os.path.join(root, "csrc/cuda/attention/decode.cu")).read().encode()
    common = os.path.join(root, "csrc/common")
    names = sorted(os.listdir(common))
    headers = [open(os.path.join(common, n)).read().encode() for n in names]
    include = [f"common/{n}".encode() for n in names]
    strings = ctypes.c_char_p * len(names)
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"decode.cu", len(names), strings(*headers), strings(*include)):
        sys.exit("nvrtcCreateProgram failed")
    for k in KERNELS:
        lib.nvrtcAddNameExpression(prog, k.encode())
    opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++17", b"-DSPARKINFER_JIT=1"]
    if lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts)):
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        sys.exit(f"{root} {arch}: compile failed\n{log.value.decode()}")
    lowered = {}
    for k in KERNELS:
        name = ctypes.c_char_p()
        lib.nvrtcGetLoweredName(prog, k.encode(), ctypes.byref(name))
        lowered[k] = name.value.decode()
    size = ctypes.c_size_t()
    lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
    cubin = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetCUBIN(prog, cubin)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return cubin.raw, lowered


def sections(elf):
    """Section name -> bytes of a 64-bit little-endian ELF (NOBITS sections empty)."""
    shoff = struct.unpack_from("<Q", elf, 0x28)[0]
    entsize, count, names_at = struct.unpack_from("<HHH", elf, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", elf, shoff + i * entsize) for i in range(count)]
    names = headers[names_at][4]
    out = {}
    for name, kind, _, _, offset, size in headers:
        label = elf[names + name : elf.index(b"\0", names + name)].decode()
        out[label] = b"" if kind == 8 else elf[offset : offset + size]
    return out


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    old, new = sys.argv[1], sys.argv[2]
    archs = sys.argv[3:] or ["sm_90", "sm_120", "sm_121", "sm_110"]
    lib = nvrtc()
    differ = 0
    for arch in archs:
        (a, la), (b, lb) = compile_tree(lib, old, arch), compile_tree(lib, new, arch)
        sa, sb = sections(a), sections(b)
        for k in KERNELS:
            ta, tb = sa.get(".text." + la[k]), sb.get(".text." + lb[k])
            same = ta is not None and ta == tb
            differ += not same
            print(f"{arch:7} {k:40} {'identical' if same else 'DIFFERENT'} ({len(ta or b'')} / {len(tb or b'')} bytes)")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
