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

from export.bundle import FORMATS, LABELS, MANIFEST, MULTITASK_BUNDLE_FORMAT, PRECISIONS, VARIANTS
from export.exporter import (
    DEFAULT_OPSET,
    INPUT_NAME,
    MAPS_NAME,
    OUTPUT_NAME,
    check_at_export,
    check_destination,
    export_onnx,
    failure_reason,
    graph_manifest,
    judge_on_heldout,
    maps_identical,
    replace_dir,
    run_source,
    staging_folder,
    write_selfcheck,
)
from export.quantize import quantize_int8
from export.verify import (
    BATCH_SIZES,
    calibration_inputs,
    compare,
    heldout_inputs,
    heldout_result,
    selfcheck_inputs,
    verification_pixels,
    verify_formats,
)
from fpet import selfcheck
from fpet.atomic import write_json_atomic
from fpet.errors import FpetError
from fpet.multitask import stack_tasks
from fpet.sessions import OPTIMIZATION, create_session
from training.checkpoint import ADAPTERS, load_run
from training.data import Preprocessing, label_groups

TASK_INPUT = "task"
CALIBRATION_IMAGES = 128  # static int8: shared between the tasks
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
            raise FpetError(
                f"task name {name!r}: use letters, digits, '_', '.', '-' (at most 64), starting with a "
                "letter or digit; name it with NAME=RUN"
            )
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


def verify_tasks(
    session, inputs: np.ndarray, references: dict[str, tuple[np.ndarray, np.ndarray]], precision: str = "fp32"
) -> dict:
    """Each task alone at every batch size, then one mixed batch (image i takes task i mod T), against each run's
    PyTorch logits (its own classes only) and, where the graph merges, its merge maps as groupings of patches (which
    must be identical in fp32 only: lower precisions may pick another partner for a near-tie)."""
    results: dict = {"tasks": {}}
    for t, (name, (logits, _)) in enumerate(references.items()):

        def run(x: np.ndarray, t: int = t, classes: int = logits.shape[1]) -> np.ndarray:
            feeds = {INPUT_NAME: x, TASK_INPUT: np.full(len(x), t, dtype=np.int64)}
            return session.run([OUTPUT_NAME], feeds)[0][:, :classes]

        results["tasks"][name] = verify_formats(logits, inputs, {"onnx": run}, precision)["onnx"]
    mixed_tasks = np.arange(len(inputs), dtype=np.int64) % len(references)
    merges = any(maps.shape[1] for _, maps in references.values())
    outputs = [OUTPUT_NAME, MAPS_NAME] if merges else [OUTPUT_NAME]
    got = run_graph(session, inputs, mixed_tasks, max(BATCH_SIZES), outputs)
    mixed: dict = {"batch_size": max(BATCH_SIZES), "tasks": {}}
    for t, (name, (logits, maps)) in enumerate(references.items()):
        rows = mixed_tasks == t
        mixed["tasks"][name] = compare(logits[rows], got[0][rows, : logits.shape[1]].astype(np.float32), precision)
        if merges:
            identical = maps_identical(got[1][rows], maps[rows])
            mixed["tasks"][name]["merge_maps_identical"] = identical
            mixed["tasks"][name]["passed"] &= precision != "fp32" or identical == 1.0
    mixed["passed"] = all(r["passed"] for r in mixed["tasks"].values())
    results["mixed_batch"] = mixed
    results["passed"] = mixed["passed"] and all(r["passed"] for r in results["tasks"].values())
    return results


def task_calibration(configs: dict) -> tuple[np.ndarray, np.ndarray]:
    """Static int8's calibration images: each task's share of training images, with its task index."""
    per_task = max(CALIBRATION_IMAGES // len(configs), 8)
    images, tasks = [], []
    for t, config in enumerate(configs.values()):
        found = calibration_inputs(config, per_task)
        if found is None:
            raise FpetError(
                "static int8 calibrates on each task's training images: a task's data is not on this "
                "machine (use --quantization dynamic)"
            )
        images.append(found)
        tasks.append(np.full(len(found), t, dtype=np.int64))
    order = round_robin(tasks)
    return np.concatenate(images)[order], np.concatenate(tasks)[order]


def round_robin(groups: list[np.ndarray]) -> np.ndarray:
    """The order that takes one item of each group in turn (of the groups concatenated), as mixed traffic comes."""
    return np.argsort(np.concatenate([np.arange(len(g)) for g in groups]), kind="stable")


def heldout_mixed(session, references: dict, configs: dict, dtype: type) -> dict[str, dict | None]:
    """Each task's held-out test images (where its data is here) through the graph in mixed batches, taking turns
    across tasks as live traffic would, judged per task against its PyTorch model: accuracy and top-1 agreement."""
    found = {name: heldout_inputs(configs[name]) for name in references}
    inputs, tasks, rows = [], [], {}
    for t, (name, model) in enumerate(references.items()):
        if found[name] is None:
            continue
        x, labels = found[name]
        with torch.no_grad():
            expected = torch.cat([model(x[i : i + 64]) for i in range(0, len(x), 64)]).numpy()
        rows[name] = (t, expected, labels.numpy())
        inputs.append(x.numpy())
        tasks.append(np.full(len(x), t, dtype=np.int64))
    results: dict[str, dict | None] = {name: None for name in references}
    if not rows:
        return results
    x, t = np.concatenate(inputs), np.concatenate(tasks)
    order = round_robin(tasks)
    logits = run_graph(session, x[order].astype(dtype), t[order], max(BATCH_SIZES), [OUTPUT_NAME])[0]
    got = np.empty_like(logits, dtype=np.float32)
    got[order] = logits
    for name, (index, expected, labels) in rows.items():
        mine = t == index
        results[name] = heldout_result(expected, got[mine, : expected.shape[1]], labels)
    return results


def task_selfcheck(
    folder: Path, references: dict, configs: dict, fallback: torch.Tensor, width: int, run: Callable
) -> dict:
    """selfcheck.npz for several tasks: a share of the images for each, with its own run's test images and logits
    (padded to the graph's width), each image tagged with its task and its number of classes."""
    per_task = max(4, selfcheck.IMAGES // len(references))
    inputs, logits, tasks, classes, described = [], [], [], [], []
    for t, (name, model) in enumerate(references.items()):
        x, source = selfcheck_inputs(configs[name], fallback, per_task)
        with torch.no_grad():
            y = model(x).numpy()
        inputs.append(x.numpy())
        logits.append(np.pad(y, ((0, 0), (0, width - y.shape[1]))))
        tasks.append(np.full(len(x), t))
        classes.append(np.full(len(x), y.shape[1]))
        described.append(f"{name}: {source}")
    return write_selfcheck(
        folder,
        np.concatenate(inputs),
        np.concatenate(logits),
        run,
        np.concatenate(tasks),
        "; ".join(described),
        np.concatenate(classes),
    )


def export_multitask(
    tasks: list[tuple[str, Path]],
    out: str | Path,
    *,
    variant: str = "fpet",
    opset: int = DEFAULT_OPSET,
    precision: str = "fp32",
    quantization: str = "dynamic",
    log: Callable[[str], None] = print,
) -> dict:
    """One verified ONNX bundle serving every task; `variant` backbone drops the merges (for comparison). fp16 and
    int8 are judged per task on its held-out images, in mixed batches, where the tasks' data is here."""
    if variant not in VARIANTS:
        raise FpetError(f"unknown variant {variant!r}; choose one of: {', '.join(VARIANTS)}")
    if precision not in PRECISIONS:
        raise FpetError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    out = Path(out)
    check_destination(out)
    schedule = "none" if variant == "backbone" else None
    references, configs = {}, {}
    for name, run in tasks:
        log(f"loading task {name} from {run} ...")
        references[name], configs[name] = load_run(run, schedule=schedule)
    check_shared(configs)
    deployed = [copy.deepcopy(m).freeze_for_deployment().set_fused_attention(False) for m in references.values()]
    dtype = torch.float16 if precision == "fp16" else torch.float32
    np_dtype = np.float16 if precision == "fp16" else np.float32
    stacked = stack_tasks(deployed).to(dtype)
    first = configs[tasks[0][0]]
    pixels, image_names = verification_pixels(first)
    inputs = Preprocessing.from_dict(first["preprocessing"]).to_input(pixels)
    with torch.no_grad():
        expected = {name: tuple(t.numpy() for t in m.forward_explained(inputs)) for name, m in references.items()}

    with staging_folder(out) as tmp:
        start = time.monotonic()
        log(f"exporting {variant} with {len(tasks)} tasks as onnx ({precision}) ...")
        example = (inputs[:2].to(dtype), torch.tensor([0, 1 % len(tasks)]))
        path = tmp / FORMATS["onnx"]
        quantized = None
        if precision == "int8":
            fp32 = tmp / "model.fp32.onnx"
            export_onnx(stacked, fp32, example, opset, maps=stacked.merges, input_names=(INPUT_NAME, TASK_INPUT))
            calibration, calibration_tasks = task_calibration(configs) if quantization == "static" else (None, None)
            log(f"quantizing to int8 ({quantization}) ...")
            try:
                quantized = quantize_int8(fp32, path, quantization, calibration, calibration_tasks)
            finally:
                fp32.unlink()
        else:
            export_onnx(stacked, path, example, opset, maps=stacked.merges, input_names=(INPUT_NAME, TASK_INPUT))
        seconds = round(time.monotonic() - start, 2)
        log(f"verifying every task alone and in a mixed batch against PyTorch on {len(image_names)} images ...")
        session = create_session(path, optimization=OPTIMIZATION)
        verification = verify_tasks(session, inputs.numpy().astype(np_dtype), expected, precision)
        if precision != "fp32":
            log("measuring each task's accuracy on its held-out images, in mixed batches, against its fp32 model ...")
            for name, heldout in heldout_mixed(session, references, configs, np_dtype).items():
                judge_on_heldout(verification["tasks"][name], heldout)
            if all(verification["tasks"][name]["heldout"] is not None for name in references):
                verification["mixed_batch"]["judged_on"] = "each task's held-out images, in mixed batches"
                verification["mixed_batch"]["verification_images_passed"] = verification["mixed_batch"]["passed"]
                verification["mixed_batch"]["passed"] = True  # the held-out images ran mixed
            verification["passed"] = verification["mixed_batch"]["passed"] and all(
                r["passed"] for r in verification["tasks"].values()
            )
        sources = {name: run_source(run) for name, run in tasks}
        manifest = {
            "bundle_format": MULTITASK_BUNDLE_FORMAT,
            "name": out.resolve().name,
            "version": bundle_version(tasks, sources),
            "variant": variant,
            **graph_manifest(first, stacked, precision, opset, {"onnx": FORMATS["onnx"]}),
            "task_input": {"name": TASK_INPUT, "shape": ["batch"], "dtype": "int64"},
            "output": {
                "name": OUTPUT_NAME,
                "shape": ["batch", stacked.num_classes],
                "note": "a task's logits are the first num_classes columns; the rest are padding",
            },
            "num_classes": stacked.num_classes,
            "tasks": [
                {
                    "name": name,
                    "index": t,
                    "num_classes": len(configs[name]["labels"]),
                    "label_groups": label_groups(configs[name]),
                    "source_run": sources[name],
                    "adapter_bytes": (run / ADAPTERS).stat().st_size,
                }
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
        }
        if quantized is not None:
            manifest["quantization"] = quantized
        run_here = lambda x, t: session.run([OUTPUT_NAME], {INPUT_NAME: x.astype(np_dtype), TASK_INPUT: t})[0]  # noqa: E731
        manifest["selfcheck"] = task_selfcheck(tmp, references, configs, inputs, stacked.num_classes, run_here)
        checked = check_at_export(run_here, tmp, manifest)
        verification["selfcheck"] = checked
        verification["passed"] &= checked["passed"]
        manifest["verification"].update(selfcheck=checked, passed=verification["passed"])
        write_json_atomic(tmp / LABELS, {name: configs[name]["labels"] for name, _ in tasks})
        write_json_atomic(tmp / MANIFEST, manifest)
        if not verification["passed"]:
            failed = [
                f"{n} ({failure_reason({'onnx': r}, ['onnx']).removeprefix('onnx: ')})"
                for n, r in verification["tasks"].items()
                if not r["passed"]
            ]
            failed += [f"{n} (mixed batch)" for n, r in verification["mixed_batch"]["tasks"].items() if not r["passed"]]
            raise FpetError(f"verification failed for {', '.join(failed)}; the bundle was not written")
        replace_dir(tmp, out)
    return manifest
