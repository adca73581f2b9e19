"""Multi-task bundles: several runs of one backbone frozen into one ONNX graph whose adapters and heads are banks
indexed by a per-image `task` input (`fpet.multitask`), verified task by task and on mixed batches against each
run's own PyTorch model before the bundle is renamed into place."""

from __future__ import annotations

import copy
import hashlib
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from export.bundle import FORMATS, LABELS, MANIFEST, MULTITASK_BUNDLE_FORMAT, VARIANTS
from export.exporter import (
    DEFAULT_OPSET,
    INPUT_NAME,
    MAPS_NAME,
    OUTPUT_NAME,
    check_destination,
    export_onnx,
    graph_manifest,
    maps_identical,
    replace_dir,
    run_source,
    staging_folder,
)
from export.verify import BATCH_SIZES, compare, verification_pixels, verify_formats
from fpet.atomic import write_json_atomic
from fpet.errors import FpetError
from fpet.multitask import stack_tasks
from fpet.sessions import OPTIMIZATION, create_session
from training.checkpoint import ADAPTERS, load_run
from training.data import Preprocessing, label_groups

TASK_INPUT = "task"
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# What every task of a bundle must share, as (what to call it, how to read it from a run config).
SHARED = (
    ("backbone weights", lambda c: (c["backbone"]["name"], c["backbone"]["tensors_sha256"])),
    ("preprocessing (image size, normalisation)", lambda c: c["preprocessing"]),
    ("merge schedule", lambda c: c["schedule"]),
    ("PET method and adapter width", lambda c: (c["method"], c["pet"].get("width"))),
)


def parse_tasks(items: list[str]) -> list[tuple[str, Path]]:
    """`RUN` or `NAME=RUN` (the name defaults to the run folder's); names are URL path segments and metric labels."""
    tasks = []
    for item in items:
        name, sep, run = item.partition("=")
        if not sep:
            name, run = Path(item).resolve().name, item
        if not TASK_NAME.fullmatch(name):
            raise FpetError(f"task name {name!r}: use letters, digits, '_', '.', '-' (at most 64), starting with a "
                            "letter or digit; name it with NAME=RUN")  # fmt: skip
        if name in VARIANTS:
            raise FpetError(f"task name {name!r} is a variant's name; name the task with NAME=RUN")
        tasks.append((name, Path(run)))
    names = [name for name, _ in tasks]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise FpetError(f"task {repeated[0]!r} is given twice; name each task with NAME=RUN")
    if not tasks:
        raise FpetError("give at least one run with --tasks")
    return tasks


def check_shared(configs: dict[str, dict]) -> None:
    """Refuse runs that cannot share one graph, naming the first difference."""
    (first, reference), *others = configs.items()
    for what, read in SHARED:
        for name, config in others:
            if read(config) != read(reference):
                raise FpetError(
                    f"tasks {first!r} and {name!r} differ in {what}: {read(reference)} vs {read(config)}; the tasks "
                    "of a multi-task bundle share the backbone, image size, merge schedule and adapter configuration"
                )


def bundle_version(tasks: list[tuple[str, Path]], sources: dict[str, dict]) -> str:
    digest = hashlib.sha256()
    for name, _ in tasks:
        digest.update(f"{name}={sources[name]['sha256']};".encode())
    return digest.hexdigest()[:12]


def run_graph(session, inputs: np.ndarray, tasks: np.ndarray, batch: int, outputs: list[str]) -> list[np.ndarray]:
    parts = [
        session.run(outputs, {INPUT_NAME: inputs[i : i + batch], TASK_INPUT: tasks[i : i + batch]})
        for i in range(0, len(inputs), batch)
    ]
    return [np.concatenate([p[k] for p in parts]) for k in range(len(outputs))]


def verify_tasks(session, inputs: np.ndarray, references: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict:
    """Each task alone at every batch size, then one mixed batch (image i takes task i mod T), against each run's
    PyTorch logits (its own classes only) and, where the graph merges, its merge maps as groupings of patches."""
    results: dict = {"tasks": {}}
    for t, (name, (logits, _)) in enumerate(references.items()):

        def run(x: np.ndarray, t: int = t, classes: int = logits.shape[1]) -> np.ndarray:
            feeds = {INPUT_NAME: x, TASK_INPUT: np.full(len(x), t, dtype=np.int64)}
            return session.run([OUTPUT_NAME], feeds)[0][:, :classes]

        results["tasks"][name] = verify_formats(logits, inputs, {"onnx": run}, "fp32")["onnx"]
    mixed_tasks = np.arange(len(inputs), dtype=np.int64) % len(references)
    merges = any(maps.shape[1] for _, maps in references.values())
    outputs = [OUTPUT_NAME, MAPS_NAME] if merges else [OUTPUT_NAME]
    got = run_graph(session, inputs, mixed_tasks, max(BATCH_SIZES), outputs)
    mixed: dict = {"batch_size": max(BATCH_SIZES), "tasks": {}}
    for t, (name, (logits, maps)) in enumerate(references.items()):
        rows = mixed_tasks == t
        mixed["tasks"][name] = compare(logits[rows], got[0][rows, : logits.shape[1]], "fp32")
        if merges:
            identical = maps_identical(got[1][rows], maps[rows])
            mixed["tasks"][name]["merge_maps_identical"] = identical
            mixed["tasks"][name]["passed"] &= identical == 1.0
    mixed["passed"] = all(r["passed"] for r in mixed["tasks"].values())
    results["mixed_batch"] = mixed
    results["passed"] = mixed["passed"] and all(r["passed"] for r in results["tasks"].values())
    return results


def export_multitask(
    tasks: list[tuple[str, Path]],
    out: str | Path,
    *,
    variant: str = "fpet",
    opset: int = DEFAULT_OPSET,
    log: Callable[[str], None] = print,
) -> dict:
    """One verified fp32 ONNX bundle serving every task; `variant` backbone drops the merges (for comparison)."""
    if variant not in VARIANTS:
        raise FpetError(f"unknown variant {variant!r}; choose one of: {', '.join(VARIANTS)}")
    out = Path(out)
    check_destination(out)
    schedule = "none" if variant == "backbone" else None
    references, configs = {}, {}
    for name, run in tasks:
        log(f"loading task {name} from {run} ...")
        references[name], configs[name] = load_run(run, schedule=schedule)
    check_shared(configs)
    deployed = [copy.deepcopy(m).freeze_for_deployment().set_fused_attention(False) for m in references.values()]
    stacked = stack_tasks(deployed)
    first = configs[tasks[0][0]]
    pixels, image_names = verification_pixels(first)
    inputs = Preprocessing.from_dict(first["preprocessing"]).to_input(pixels)
    with torch.no_grad():
        expected = {name: tuple(t.numpy() for t in m.forward_explained(inputs)) for name, m in references.items()}

    with staging_folder(out) as tmp:
        start = time.monotonic()
        log(f"exporting {variant} with {len(tasks)} tasks as onnx (fp32) ...")
        example = (inputs[:2], torch.tensor([0, 1 % len(tasks)]))
        path = tmp / FORMATS["onnx"]
        export_onnx(stacked, path, example, opset, maps=stacked.merges, input_names=(INPUT_NAME, TASK_INPUT))
        seconds = round(time.monotonic() - start, 2)
        log(f"verifying every task alone and in a mixed batch against PyTorch on {len(image_names)} images ...")
        session = create_session(path, optimization=OPTIMIZATION)
        verification = verify_tasks(session, inputs.numpy(), expected)
        sources = {name: run_source(run) for name, run in tasks}
        manifest = {
            "bundle_format": MULTITASK_BUNDLE_FORMAT,
            "name": out.resolve().name,
            "version": bundle_version(tasks, sources),
            "variant": variant,
            **graph_manifest(first, stacked, "fp32", opset, {"onnx": FORMATS["onnx"]}),
            "task_input": {"name": TASK_INPUT, "shape": ["batch"], "dtype": "int64"},
            "output": {"name": OUTPUT_NAME, "shape": ["batch", stacked.num_classes],
                       "note": "a task's logits are the first num_classes columns; the rest are padding"},
            "num_classes": stacked.num_classes,
            "tasks": [
                {"name": name, "index": t, "num_classes": len(configs[name]["labels"]),
                 "label_groups": label_groups(configs[name]), "source_run": sources[name],
                 "adapter_bytes": (run / ADAPTERS).stat().st_size}
                for t, (name, run) in enumerate(tasks)
            ],
            "files": {"onnx": FORMATS["onnx"], "labels": LABELS},
            "verification": {
                "images": image_names,
                "reference": "each task's PyTorch fp32 model, training form, eval mode",
                **verification,
                "checked_on": "CPUExecutionProvider",
            },
            "export_seconds": {"onnx": seconds},
        }  # fmt: skip
        write_json_atomic(tmp / LABELS, {name: configs[name]["labels"] for name, _ in tasks})
        write_json_atomic(tmp / MANIFEST, manifest)
        if not verification["passed"]:
            failed = [n for n, r in verification["tasks"].items() if not r["passed"]]
            failed += [f"{n} (mixed batch)" for n, r in verification["mixed_batch"]["tasks"].items() if not r["passed"]]
            raise FpetError(f"verification failed for {', '.join(failed)}; the bundle was not written")
        replace_dir(tmp, out)
    return manifest
