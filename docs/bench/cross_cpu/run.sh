#!/bin/bash
# Native vs emulated AVX2-only (qemu-x86_64 -cpu Haswell; apt-get install qemu-user) logits of bundles on N test
# images. About 8 s per image emulated: too slow for the test suite.
#   docs/bench/cross_cpu/run.sh OUT_DIR N BUNDLE...
set -euo pipefail
out=$1; n=$2; shift 2
mkdir -p "$out"
PY=${PYTHON:-.venv/bin/python}
for bundle in "$@"; do
  name=$(basename "$(dirname "$bundle")")-$(basename "$bundle")
  PYTHONPATH=. "$PY" docs/bench/cross_cpu/logits.py "$bundle" "$n" "$out/$name-native.npz"
  PYTHONPATH=. qemu-x86_64 -cpu Haswell "$PY" docs/bench/cross_cpu/logits.py "$bundle" "$n" "$out/$name-haswell.npz"
done
PYTHONPATH=. "$PY" docs/bench/cross_cpu/compare.py "$out" | tee "$out/results.json"
