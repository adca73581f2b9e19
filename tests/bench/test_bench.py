import threading
import time
from pathlib import Path

import pytest

from bench.train import bench_train, markdown


def test_train_benchmark_smoke():
    rows = bench_train(
        "vit_tiny_patch16_224",
        32,
        ["adaptformer"],
        ["none", "6:0.5"],
        batch_size=4,
        steps=1,
        warmup=0,
        repeats=1,
        threads=1,
        log=lambda _: None,
    )
    assert [r["schedule"] for r in rows] == ["none", "6:0.5"]
    assert rows[0]["speedup"] == 1.0 and rows[1]["images_per_s"] > 0 and rows[1]["peak_rss_mb"] > 0
    assert "| adaptformer | `6:0.5` |" in markdown(rows)


def test_onnx_benchmark_smoke(tmp_path):
    from bench.onnx_runtime import bench_bundles
    from bench.onnx_runtime import markdown as onnx_markdown
    from export.exporter import ExportOptions, export_bundle
    from tests.helpers.tiny import make_run

    run = make_run(tmp_path / "run")
    for variant in ("backbone", "fpet"):
        export_bundle(run, tmp_path / variant, ExportOptions(variant=variant, formats=("onnx",)), log=lambda _: None)
    rows = bench_bundles([tmp_path / "backbone", tmp_path / "fpet"], [1, 2], repeats=1, min_seconds=0.01, threads=1)
    assert len(rows) == 2 * 2 * 2
    assert all(r["ms_per_image"] > 0 for r in rows)
    fpet = next(r for r in rows if r["variant"] == "fpet")
    assert fpet["ideal_speedup_vs_first"] > 1
    assert "/fpet | fpet | onnxruntime | fp32 | `6:0.5` |" in onnx_markdown(rows)


def test_onnx_benchmark_runs_each_bundle_in_every_runtime_and_precision_it_can(tiny_bundles):
    from bench.onnx_runtime import bench_bundles, runs_here
    from export.bundle import read_manifest
    from fpet.runtimes import cpu_features, supports

    bundles = [tiny_bundles["backbone"], tiny_bundles["fpet"]]
    rows = bench_bundles(
        bundles,
        [2],
        ("ORT_ENABLE_ALL",),
        repeats=1,
        min_seconds=0.01,
        threads=1,
        runtimes=("onnxruntime", "openvino"),
        precisions=("fp32", "bf16"),
    )
    expected = {("onnxruntime", "fp32"), ("openvino", "fp32")} | (
        {("openvino", "bf16")} if supports("bf16", cpu_features()) else set()
    )
    assert {(r["runtime"], r["precision"]) for r in rows if r["variant"] == "fpet"} == expected
    assert not runs_here(read_manifest(bundles[0]), "onnxruntime", "bf16")  # no bf16 kernels in onnxruntime's CPU
    fpet = next(r for r in rows if r["variant"] == "fpet" and r["runtime"] == "openvino" and r["precision"] == "fp32")
    assert fpet["speedup_vs_first"] > 0 and fpet["speedup_vs_onnxruntime_fp32"] > 0


def test_onnx_benchmark_callers_share_one_session(tmp_path, monkeypatch):
    """Two callers must be inside one session's run at the same time, as two service instances are."""
    from bench import onnx_runtime
    from export.exporter import ExportOptions, export_bundle
    from fpet.errors import FpetError
    from tests.helpers.tiny import make_run

    run = make_run(tmp_path / "run")
    export_bundle(run, tmp_path / "fpet", ExportOptions(variant="fpet", formats=("onnx",)), log=lambda _: None)
    inside, most, lock = 0, 0, threading.Lock()
    real_session = onnx_runtime.session

    def watched_session(*args):
        real = real_session(*args)

        class Watched:
            def get_inputs(self):
                return real.get_inputs()

            def run(self, outputs, feed):
                nonlocal inside, most
                with lock:
                    inside += 1
                    most = max(most, inside)
                try:
                    time.sleep(0.005)
                    return real.run(outputs, feed)
                finally:
                    with lock:
                        inside -= 1

        return Watched()

    monkeypatch.setattr(onnx_runtime, "session", watched_session)
    rows = onnx_runtime.bench_bundles(
        [tmp_path / "fpet"], [2], ("ORT_ENABLE_ALL",), repeats=1, min_seconds=0.1, threads=1, callers=2
    )
    assert most == 2 and rows[0]["callers"] == 2 and rows[0]["ms_per_image"] > 0
    assert "threads per caller: 1, callers per session: 2" in onnx_runtime.markdown(rows)
    with pytest.raises(FpetError, match="callers must be at least 1"):
        onnx_runtime.bench_bundles([tmp_path / "fpet"], [2], callers=0)


def test_model_benchmark_smoke(tmp_path):
    from bench.model import bench_model, plot
    from bench.model import markdown as model_markdown
    from fpet.runtimes import cpu_features, supports

    rows = bench_model(
        "vit_tiny_patch16_224",
        64,
        ["6:0.5"],
        ["torch", "onnx", "openvino"],
        [2],
        threads=1,
        precisions=["fp32", "bf16"],
        repeats=2,
        min_seconds=0.01,
        log=lambda _: None,
    )
    setups = {("torch", "fp32"), ("onnxruntime", "fp32"), ("openvino", "fp32"), ("torch", "bf16")}
    if supports("bf16", cpu_features()):
        setups.add(("openvino", "bf16"))
    assert {(r["schedule"], r["runtime"], r["precision"]) for r in rows} == {
        (s, *setup) for s in ("none", "6:0.5") for setup in setups
    }
    assert all(r["speedup_vs_onnxruntime_fp32"] > 0 for r in rows)
    fpet = next(r for r in rows if r["schedule"] == "6:0.5" and r["runtime"] == "torch" and r["precision"] == "fp32")
    assert fpet["ideal_speedup"] > 1 and 0 < fpet["merge_share_of_time"] < 1
    assert all(r["speedup"] == 1.0 for r in rows if r["schedule"] == "none")
    assert "| `6:0.5` | onnxruntime | fp32 | 2 |" in model_markdown(rows)
    assert all(p.stat().st_size > 1000 for p in plot(rows, tmp_path))


def test_bundle_predictions_cover_every_test_image_in_each_runtime(tmp_path, tiny_bundles):
    from bench.onnx_runtime import bundle_predictions

    tiny_test_split(tmp_path / "data", per_class=3)
    predicted, truth = bundle_predictions(tiny_bundles["fpet"], tmp_path / "data", threads=1)
    assert len(predicted) == len(truth) == 9 and set(truth.tolist()) == {0, 1, 2}
    openvino, _ = bundle_predictions(
        tiny_bundles["fpet"], tmp_path / "data", threads=1, runtime="openvino", precision="fp32"
    )
    assert openvino.tolist() == predicted.tolist()  # OpenVINO's fp32 answers as onnxruntime's


def test_bundle_predictions_run_onnxruntime_at_the_optimisation_level_asked_for(tmp_path, tiny_bundles, monkeypatch):
    """ORT_DISABLE_ALL runs a QDQ graph as written (docs/bench/cross_cpu/int8_vs_training.py): the level must reach
    the session instead of the bundle's own."""
    import bench.onnx_runtime as onnx_runtime

    tiny_test_split(tmp_path / "data", per_class=1)
    levels = []
    real = onnx_runtime.session
    monkeypatch.setattr(
        onnx_runtime, "session", lambda model, setup, threads: levels.append(setup.level) or real(model, setup, threads)
    )
    onnx_runtime.bundle_predictions(tiny_bundles["fpet"], tmp_path / "data", threads=1)
    onnx_runtime.bundle_predictions(tiny_bundles["fpet"], tmp_path / "data", threads=1, optimization="ORT_DISABLE_ALL")
    assert levels == ["ORT_ENABLE_ALL", "ORT_DISABLE_ALL"]


def tiny_test_split(data: Path, per_class: int) -> None:
    """A test split of image folders named with the tiny run's labels."""
    from tests.helpers.tiny import make_image_folder

    test = make_image_folder(data / "test", per_class=per_class, size=40)
    for i, label in enumerate("abc"):
        (test / f"class_{i}").rename(test / label)
