"""One onnxruntime session per bundle, the provider it really got, and preprocessing as the manifest says."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
from PIL import Image

from export.bundle import read_manifest
from fpet.imaging import normalize, resize_rgb
from fpet.sessions import OPTIMIZATION, create_session

log = logging.getLogger("fpet.service")
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def requested_providers(choice: str) -> list[str]:
    import onnxruntime as ort

    if choice == "cpu":
        return [CPU]
    if choice == "cuda" or CUDA in ort.get_available_providers():
        return [CUDA, CPU]
    return [CPU]


class ModelRunner:
    """A loaded bundle. `run` is called from a worker thread; onnxruntime releases the GIL while it computes."""

    def __init__(self, bundle: str | Path, providers: str = "auto", threads: int = 0):

        start = time.perf_counter()
        self.bundle = Path(bundle)
        self.manifest = read_manifest(self.bundle)
        self.name: str = self.manifest["variant"]
        self.labels: list[str] = json.loads((self.bundle / self.manifest["files"]["labels"]).read_text())
        pre = self.manifest["preprocessing"]
        self.img_size, self.mean, self.std = pre["img_size"], pre["mean"], pre["std"]
        self.dtype = np.float16 if self.manifest["precision"] == "fp16" else np.float32
        self.requested = requested_providers(providers)
        optimization = self.manifest.get("onnxruntime", {}).get("graph_optimization_level", OPTIMIZATION)
        self.session = create_session(
            self.bundle / self.manifest["files"]["onnx"], self.requested, threads, optimization
        )
        self.provider: str = self.session.get_providers()[0]
        self.fell_back = self.requested[0] == CUDA and self.provider != CUDA
        if self.fell_back:
            log.error("%s: CUDA was asked for but onnxruntime runs on %s", self.name, self.provider)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.manifest["output"]["name"]
        self.merge_maps: dict | None = self.manifest.get("merge_maps")  # None: no merges, or an older bundle
        self.io_binding = self.on_gpu  # bound buffers: one host-to-device copy per batch, no per-run allocation
        self.load_seconds = time.perf_counter() - start
        self.warmup_seconds = 0.0

    @property
    def on_gpu(self) -> bool:
        return self.provider == CUDA

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """float [3, S, S] exactly as in training (fpet.imaging)."""
        return normalize(resize_rgb(image, self.img_size)[None], self.mean, self.std)[0].astype(self.dtype)

    def run(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=self.dtype)
        if not self.io_binding:
            return self.session.run([self.output_name], {self.input_name: batch})[0].astype(np.float32)
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, batch)
        binding.bind_output(self.output_name, "cpu")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0].astype(np.float32)

    def explain(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits and merge maps ([B, merge points, patches]) in one run; maps None when the bundle has none."""
        if self.merge_maps is None:
            return self.run(batch), None
        names = [self.output_name, self.merge_maps["output"]]
        logits, maps = self.session.run(names, {self.input_name: np.ascontiguousarray(batch, dtype=self.dtype)})
        return logits.astype(np.float32), maps

    def warm_up(self, max_batch: int) -> None:
        """Run every batch size the batcher may form, so no request pays for a first-time allocation."""
        start = time.perf_counter()
        for size in range(1, max_batch + 1):
            self.run(np.zeros((size, 3, self.img_size, self.img_size), dtype=self.dtype))
        self.warmup_seconds = time.perf_counter() - start
