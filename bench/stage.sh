#!/usr/bin/env bash
# Builds the release library, CLI and test binaries here and copies them into .gpu/ (git-ignored), the
# folder the GPU machine receives through the device tool's `carry`. Then, there: bash bench/gpu_run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu && mkdir -p .gpu/tests
cargo build --release --bins --lib
cargo test --release --no-run --message-format=json 2>/dev/null |
  python3 -c '
import json, shutil, sys, os
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    name = m.get("target", {}).get("name", "")
    wanted = name.startswith("gpu_") or name == "c_examples"
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"] and wanted:
        shutil.copy(m["executable"], os.path.join(".gpu/tests", m["target"]["name"]))
'
cp target/release/libsparkinfer.so target/release/sparkinfer .gpu/
# Symbols stay here; the device tool carries at most 64 MiB.
strip .gpu/sparkinfer .gpu/libsparkinfer.so .gpu/tests/*
ls -la .gpu .gpu/tests
du -sh .gpu
