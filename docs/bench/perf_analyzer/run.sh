#!/usr/bin/env bash
# perf_analyzer against `fpet serve` (default model, --grpc-port), over HTTP and gRPC, both variants, interleaved, next
# to `fpet bench http` on the same server. Output: docs/bench/perf_analyzer/*.txt and bench_http/. Run from the
# repository root after `make bundles` and `make tools`; takes about 8 minutes on 2 cores.
set -euo pipefail
OUT=docs/bench/perf_analyzer
PA="env $(./bench/perf_analyzer.sh)"
.venv/bin/fpet serve --port 8400 --grpc-port 8401 > /tmp/perf_analyzer_serve.log 2>&1 &
SERVER=$!
trap 'kill $SERVER' EXIT
for _ in $(seq 120); do curl -sf 127.0.0.1:8400/readyz >/dev/null && break; sleep 1; done
: > "$OUT/runs.txt"
for round in 1 2 3; do
  for concurrency in 1 16; do
    for protocol in http grpc; do
      for model in fpet backbone; do
        address=127.0.0.1:8400; [ "$protocol" = grpc ] && address=127.0.0.1:8401
        echo "### round $round model $model protocol $protocol concurrency $concurrency" >> "$OUT/runs.txt"
        $PA -m "$model" -i "$protocol" -u "$address" --input-data samples/perf_analyzer_image.json \
          --concurrency-range "$concurrency" --measurement-interval 4000 >> "$OUT/runs.txt" 2>&1
      done
    done
  done
done
.venv/bin/fpet bench http --url http://127.0.0.1:8400 --routes oip-image --concurrency 1,16 --duration 8 --repeats 3 \
  --image samples/ankle_boot.png --out "$OUT/bench_http" > "$OUT/bench_http.txt" 2>&1
