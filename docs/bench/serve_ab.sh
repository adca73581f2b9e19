#!/usr/bin/env bash
# The service from another checkout (A, e.g. `git worktree add /tmp/before COMMIT`) against this one (B), both
# started with no flags and kept up, loaded in turn by wrk (16 connections, samples/*.png) in ABBA order, so that a
# slow spell on the shared cores falls on both. Prints requests/s per run, then medians and B/A per pair.
#   docs/bench/serve_ab.sh /tmp/before [ROUNDS] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
before=$(realpath "$1"); rounds=${2:-6}; seconds=${3:-8}
PYTHONPATH=$before .venv/bin/fpet serve --port 8101 > /tmp/serve_ab_a.log 2>&1 & a=$!
.venv/bin/fpet serve --port 8102 > /tmp/serve_ab_b.log 2>&1 & b=$!
trap 'kill $a $b 2>/dev/null' EXIT
for port in 8101 8102; do
  for _ in $(seq 240); do curl -sf "http://127.0.0.1:$port/readyz" > /dev/null && break; sleep 1; done
done
load() {  # port model tag
  .venv/bin/fpet bench http --url "http://127.0.0.1:$1" --models "$2" --concurrency 16 --duration "$seconds" \
    | awk -F'|' -v tag="$3 $2" '/^\| classify/ {print tag, $11 + 0}'
}
results=$(for r in $(seq "$rounds"); do
  for model in fpet backbone; do
    if (( r % 2 )); then load 8101 $model A; load 8102 $model B; else load 8102 $model B; load 8101 $model A; fi
  done
done | tee /dev/stderr)
python3 - "$results" <<'PY'
import statistics, sys
rows = [line.split() for line in sys.argv[1].splitlines()]
for model in ("fpet", "backbone"):
    a = [float(r[2]) for r in rows if r[:2] == ["A", model]]
    b = [float(r[2]) for r in rows if r[:2] == ["B", model]]
    pairs = ", ".join(f"{y / x:.3f}" for x, y in zip(a, b))
    print(f"{model}: A {statistics.median(a):.1f} req/s, B {statistics.median(b):.1f} req/s, "
          f"B/A {statistics.median(b) / statistics.median(a):.3f} (pairs {pairs})")
PY
