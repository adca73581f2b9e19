# syntax=docker/dockerfile:1
# The FPET service image, two targets:
#   docker build --target cpu -t fpet:cpu .   slim Python base, onnxruntime (CPU)         (compose's default)
#   docker build --target gpu -t fpet:gpu .   CUDA 12.6 runtime + cuDNN 9, onnxruntime-gpu
# onnxruntime-gpu 1.20.1 is built for CUDA 12.x with cuDNN 9; the base image pins CUDA 12.6.3 and cuDNN 9 together.
# A mismatch makes onnxruntime fall back to the CPU silently: the GPU setup sets FPET_ALLOW_CPU_FALLBACK=false so the
# service then stays not ready and fpet_execution_provider_fallback_total counts it.
# No torch in either image: the service runs ONNX bundles. Build the bundles on the host (`make bundles`) and mount
# them read-only at /models (docker-compose.yml does).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

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

FROM ${PYTHON_IMAGE} AS cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    FPET_HOST=0.0.0.0 FPET_PORT=8000 FPET_BUNDLES=/models/fpet,/models/backbone
COPY deploy/requirements-serve.txt /tmp/requirements-serve.txt
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir -r /tmp/requirements-serve.txt onnxruntime==1.20.1 \
    && pip install --no-cache-dir --no-deps /wheels/*.whl \
    && rm -rf /wheels /tmp/requirements-serve.txt \
    && useradd --uid 1000 --create-home fpet
WORKDIR /app
COPY --chown=1000:1000 samples ./samples
USER 1000
EXPOSE 8000
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
    FPET_HOST=0.0.0.0 FPET_PORT=8000 FPET_BUNDLES=/models/fpet,/models/backbone \
    FPET_PROVIDERS=cuda FPET_ALLOW_CPU_FALLBACK=false
COPY deploy/requirements-serve.txt /tmp/requirements-serve.txt
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir -r /tmp/requirements-serve.txt onnxruntime-gpu==1.20.1 \
    && pip install --no-cache-dir --no-deps /wheels/*.whl \
    && rm -rf /wheels /tmp/requirements-serve.txt \
    && (id -u 1000 >/dev/null 2>&1 || useradd --uid 1000 --create-home fpet)
WORKDIR /app
COPY --chown=1000:1000 samples ./samples
USER 1000
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status != 200)"]
CMD ["fpet", "serve"]
