#!/usr/bin/env python3
"""Compares the machine code of every kernel between two `sparkinfer compile --cubins` folders.

A change that must leave the existing kernels as they were (a new template variant, a new kernel beside them)
is checked this way before any device time is spent on it. Build each tree's `sparkinfer`, then:

  sparkinfer compile --arch sm_90,sm_120,sm_121,sm_110 --cubins OLD_DIR   (old tree's binary)
  sparkinfer compile --arch sm_90,sm_120,sm_121,sm_110 --cubins NEW_DIR   (new tree's binary)
  python3 bench/compare_cubins.py OLD_DIR NEW_DIR

For each architecture and module both folders hold, each kernel (by its name expression, so a template
parameter added with a default still pairs up) is reported identical or DIFFERENT by its `.text` section;
kernels of one side only are listed as such. Exits 1 if any kernel of both sides differs.
"""
import os
import struct
import sys


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


def modules(folder, arch):
    """The module names of one architecture of a --cubins folder."""
    return {f[: -len(".names")] for f in os.listdir(os.path.join(folder, arch)) if f.endswith(".names")}


def module(folder, arch, name):
    """(name expression -> .text bytes) of one module of a --cubins folder."""
    base = os.path.join(folder, arch, name)
    text = sections(open(base + ".cubin", "rb").read())
    kernels = {}
    for line in open(base + ".names"):
        expr, lowered = line.rstrip("\n").split("\t")
        kernels[expr] = text.get(".text." + lowered)
    return kernels


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    old, new = sys.argv[1], sys.argv[2]
    differ = 0
    for arch in sorted(set(os.listdir(old)) & set(os.listdir(new))):
        for name in sorted(modules(old, arch) & modules(new, arch)):
            a, b = module(old, arch, name), module(new, arch, name)
            for expr in sorted(set(a) | set(b)):
                if expr not in b or expr not in a:
                    print(f"{arch:7} {expr:44} only in {'old' if expr in a else 'new'}")
                    continue
                same = a[expr] is not None and a[expr] == b[expr]
                differ += not same
                sizes = f"{len(a[expr] or b'')} / {len(b[expr] or b'')} bytes"
                print(f"{arch:7} {expr:44} {'identical' if same else 'DIFFERENT'} ({sizes})")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
