#!/usr/bin/env bash
# The model benchmark on a CUDA machine: ViT-B/16 at 224, batch sizes 1 to 256, fp32 and fp16, torch eager and
# onnxruntime (CUDA provider; replace onnxruntime with onnxruntime-gpu in the environment first). Everything goes
# under one folder; about 5 minutes on one recent GPU. Usage: bash bench/gpu.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench-results/gpu}
FPET=${FPET:-.venv/bin/fpet}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.csv" || true
python3 -c "import onnxruntime as o; print(o.__version__, o.get_available_providers())" > "$OUT/onnxruntime.txt" 2>&1 || true
RUNTIMES=torch,onnx
if python3 -c "import onnxruntime as o, sys; sys.exit('TensorrtExecutionProvider' not in o.get_available_providers())"; then
  RUNTIMES=$RUNTIMES,onnx-tensorrt
fi
for precision in fp32 fp16; do
  "$FPET" bench model --device cuda --precision "$precision" --backbone vit_base_patch16_224 \
    --schedules none,6:0.5,tome:13,3:0.5+6:0.5+9:0.5 --runtimes "$RUNTIMES" \
    --batch-sizes 1,8,32,64,128,256 --repeats 3 --min-seconds 0.3 --out "$OUT/$precision" 2> "$OUT/$precision.log"
done
echo "wrote $OUT"
