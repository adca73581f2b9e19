"""One session per bundle (onnxruntime, or OpenVINO on CPUs with a bf16 matrix engine), the provider and precision
it really got, and preprocessing as the manifest says."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from export.bundle import read_manifest, runtime_facts
from fpet import selfcheck
from fpet.errors import FpetError
from fpet.imaging import normalize, resize_rgb
from fpet.runtimes import OpenVinoSession, choose, cpu_features
from fpet.sessions import OPTIMIZATION, create_session
from service.errors import ServiceError

log = logging.getLogger("fpet.service")
CUDA, CPU, OPENVINO = "CUDAExecutionProvider", "CPUExecutionProvider", "OpenVINO CPU"


def requested_providers(choice: str) -> list[str]:
    import onnxruntime as ort

    if choice == "cpu":
        return [CPU]
    if choice == "cuda" or CUDA in ort.get_available_providers():
        return [CUDA, CPU]
    return [CPU]


@dataclass(frozen=True)
class Task:
    """A task a bundle serves: its index into the graph's adapter banks and its labels (the first len(labels)
    logits). A single-task bundle serves one unnamed task with no index (its graph has no task input)."""

    name: str | None
    index: int | None
    labels: list[str]


class ModelRunner:
    """A loaded bundle. `run` is called from worker threads (`instances` at once); both runtimes release the GIL
    while they compute."""

    def __init__(
        self,
        bundle: str | Path,
        providers: str = "auto",
        threads: int = 0,
        runtime: str = "auto",
        precision: str = "auto",
        instances: int = 1,
    ):
        start = time.perf_counter()
        self.bundle = Path(bundle)
        self.manifest = read_manifest(self.bundle)
        self.name: str = self.manifest["variant"]
        labels = json.loads((self.bundle / self.manifest["files"]["labels"]).read_text())
        self.tasks: dict[str, Task] = {  # several tasks in one graph (a multi-task bundle), else empty
            t["name"]: Task(t["name"], t["index"], labels[t["name"]]) for t in self.manifest.get("tasks", [])
        }
        self.single = None if self.tasks else Task(None, None, labels)
        self.task_input: str | None = self.manifest["task_input"]["name"] if self.tasks else None
        pre = self.manifest["preprocessing"]
        self.img_size, self.mean, self.std = pre["img_size"], pre["mean"], pre["std"]
        self.dtype = np.float16 if self.manifest["precision"] == "fp16" else np.float32
        self.requested = requested_providers(providers)
        self.cpu_features = cpu_features()
        choice = choose(
            runtime,
            precision,
            **runtime_facts(self.manifest),
            gpu=self.requested[0] == CUDA,
            features=self.cpu_features,
        )
        if providers == "cuda" and choice.runtime == "openvino":
            raise FpetError("providers cuda are onnxruntime's: choose runtime onnxruntime (or auto) for a GPU")
        self.runtime, self.precision, self.runtime_reason = choice.runtime, choice.precision, choice.reason
        model = self.bundle / self.manifest["files"]["onnx"]
        if self.runtime == "openvino":
            self.session = OpenVinoSession(model, self.precision, threads * instances, instances)
            self.provider = OPENVINO
        else:
            optimization = self.manifest.get("onnxruntime", {}).get("graph_optimization_level", OPTIMIZATION)
            self.session = create_session(model, self.requested, threads, optimization)
            self.provider = self.session.get_providers()[0]
        self.fell_back = self.runtime == "onnxruntime" and self.requested[0] == CUDA and self.provider != CUDA
        if self.fell_back:
            log.error("%s: CUDA was asked for but onnxruntime runs on %s", self.name, self.provider)
        self.input_name = self.manifest["input"]["name"]
        self.output_name = self.manifest["output"]["name"]
        self.merge_maps: dict | None = self.manifest.get("merge_maps")  # None: no merges, or an older bundle
        self.io_binding = self.on_gpu  # bound buffers: one host-to-device copy per batch, no per-run allocation
        self.load_seconds = time.perf_counter() - start
        self.warmup_seconds = 0.0
        self.selfcheck: dict | None = None  # self_check's result, once run

    @property
    def on_gpu(self) -> bool:
        return self.provider == CUDA

    def task(self, name: str | None) -> Task:
        """The task a request asked for (None: the model's only task)."""
        if self.single is not None:
            if name is not None:
                raise ServiceError(404, "task_not_found", f"model {self.name!r} serves one task; it has no {name!r}")
            return self.single
        if name is None:
            raise ServiceError(
                400,
                "invalid_request",
                f"model {self.name!r} serves several tasks: name one (POST "
                f"/tasks/{{task}}/classify or ?task=) of {', '.join(self.tasks)}",
            )
        if name not in self.tasks:
            raise ServiceError(404, "task_not_found", f"no task {name!r}; {self.name} serves {', '.join(self.tasks)}")
        return self.tasks[name]

    def feeds(self, batch: np.ndarray, tasks: np.ndarray | None) -> dict[str, np.ndarray]:
        feeds = {self.input_name: np.ascontiguousarray(batch, dtype=self.dtype)}
        if self.task_input is not None:
            if tasks is None:
                raise ValueError(f"{self.name} serves several tasks: every batch needs its images' tasks")
            tasks = np.ascontiguousarray(tasks, dtype=np.int64)
            # The graph's Gather would take -1 as the last task and spread one index over the batch: say so instead.
            if tasks.shape != (len(batch),) or tasks.min() < 0 or tasks.max() >= len(self.tasks):
                raise ValueError(
                    f"{self.name}: task indices {tasks.tolist()} for {len(batch)} images; each image "
                    f"needs one of 0..{len(self.tasks) - 1}"
                )
            feeds[self.task_input] = tasks
        return feeds

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """float [3, S, S] exactly as in training (fpet.imaging)."""
        return normalize(resize_rgb(image, self.img_size)[None], self.mean, self.std)[0].astype(self.dtype)

    def run(self, batch: np.ndarray, tasks: np.ndarray | None = None) -> np.ndarray:
        """Logits [B, classes]; `tasks` (multi-task bundles): each image's task index."""
        feeds = self.feeds(batch, tasks)
        if not self.io_binding:
            return self.session.run([self.output_name], feeds)[0].astype(np.float32)
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        binding.bind_output(self.output_name, "cpu")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0].astype(np.float32)

    def explain(self, batch: np.ndarray, tasks: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits and merge maps ([B, merge points, patches]) in one run; maps None when the bundle has none."""
        if self.merge_maps is None:
            return self.run(batch, tasks), None
        names = [self.output_name, self.merge_maps["output"]]
        logits, maps = self.session.run(names, self.feeds(batch, tasks))
        return logits.astype(np.float32), maps

    def self_check(self, max_batch: int) -> dict:
        """The bundle's self-check (fpet.selfcheck) on this runtime, in the precision it computes in."""
        facts = {"runtime": self.runtime, "provider": self.provider, "cpu_features": list(self.cpu_features)}
        try:
            self.selfcheck = selfcheck.check(
                lambda x, t: self.run(x.astype(self.dtype), t),
                self.bundle,
                self.manifest,
                self.precision,
                max_batch,
                facts,
            )
        except FpetError as exc:  # an unreadable or mismatched file fails the check; it does not stop the service
            self.selfcheck = {"passed": False, "error": str(exc), "compute_precision": self.precision, **facts}
        return self.selfcheck

    def warm_up(self, max_batch: int) -> None:
        """Run every batch size the batcher may form, so no request pays for a first-time allocation."""
        start = time.perf_counter()
        for size in range(1, max_batch + 1):
            self.run(np.zeros((size, 3, self.img_size, self.img_size), dtype=self.dtype), np.zeros(size, np.int64))
        self.warmup_seconds = time.perf_counter() - start
