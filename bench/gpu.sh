#!/usr/bin/env bash
# The benchmarks on a CUDA machine, in one go (about 10 minutes on one recent GPU). Needs onnxruntime-gpu in place
# of onnxruntime and a CUDA build of torch in the environment. Usage: bash bench/gpu.sh [OUT_DIR]
#  1. model speed: ViT-B/16 at 224, batch sizes 1 to 256; fp32 and fp16 in torch eager (fused attention) and
#     onnxruntime's CUDA provider (and TensorRT where onnxruntime has it), fpet against the backbone side by side:
#     the GPU's counterpart of the CPU's bf16 comparison (docs/benchmarks.md), where the matrix products get cheap
#     and the merge's small ops and casts decide; int8 in onnxruntime (dynamic quantization on CUDA, calibrated
#     symmetric QDQ on TensorRT) where the provider takes it;
#  2. the service on CUDA (the default model's bundles, IO binding) under load from wrk or hey: fpet vs backbone.
# A step that fails is logged and the others still run; the exit status says whether all passed.
# BACKBONE, BATCH_SIZES, DEVICE, SERVE_PROVIDERS and HTTP_DURATION override the defaults: DEVICE=cpu
# SERVE_PROVIDERS=cpu with a small backbone and short durations checks the script on a machine without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench-results/gpu}
FPET=${FPET:-.venv/bin/fpet}
PYTHON=${PYTHON:-.venv/bin/python}
BACKBONE=${BACKBONE:-vit_base_patch16_224}
BATCH_SIZES=${BATCH_SIZES:-1,8,32,64,128,256}
DEVICE=${DEVICE:-cuda}
PORT=${PORT:-8093}
mkdir -p "$OUT"
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.csv" 2>&1
"$PYTHON" -c "import onnxruntime as o; print(o.__version__, o.get_available_providers())" > "$OUT/onnxruntime.txt" 2>&1
ORT_RUNTIMES=onnxruntime
if "$PYTHON" -c "import onnxruntime as o, sys; sys.exit('TensorrtExecutionProvider' not in o.get_available_providers())"; then
  ORT_RUNTIMES=onnxruntime,onnxruntime-tensorrt
fi

for precision in fp32 fp16 int8; do
  runtimes=torch,$ORT_RUNTIMES
  [ "$precision" = int8 ] && runtimes=$ORT_RUNTIMES
  if ! "$FPET" bench model --device "$DEVICE" --precisions "$precision" --backbone "$BACKBONE" \
      --schedules none,6:0.5,tome:13,3:0.5+6:0.5+9:0.5 --runtimes "$runtimes" \
      --batch-sizes "$BATCH_SIZES" --repeats 3 --min-seconds 0.3 --out "$OUT/$precision" 2> "$OUT/$precision.log"; then
    echo "model benchmark $precision failed: $(tail -n 1 "$OUT/$precision.log")"
    status=1
  fi
done

# The service on the GPU: default bundles, CUDA required (no quiet fallback to the CPU).
"$FPET" export --default > "$OUT/bundles.log" 2>&1 || { echo "default bundles failed"; status=1; }
FPET_ALLOW_CPU_FALLBACK=false "$FPET" serve --port "$PORT" --providers "${SERVE_PROVIDERS:-cuda}" \
  > "$OUT/serve.log" 2>&1 < /dev/null &
server=$!
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$PORT/readyz" > /dev/null && break
  sleep 1
done
if curl -sf "http://127.0.0.1:$PORT/readyz" > /dev/null; then
  curl -s "http://127.0.0.1:$PORT/models/fpet" > "$OUT/service_model.json"
  "$FPET" bench http --url "http://127.0.0.1:$PORT" --models backbone,fpet --concurrency 1,16,64 --duration "${HTTP_DURATION:-10}" \
    --repeats 3 --out "$OUT/http" > "$OUT/http.md" 2> "$OUT/http.log" || { echo "http benchmark failed"; status=1; }
else
  echo "the service did not become ready on $DEVICE: $(tail -n 3 "$OUT/serve.log")"
  status=1
fi
kill -TERM "$server" 2> /dev/null
wait "$server" 2> /dev/null
echo "wrote $OUT"
exit $status
