"""`fpet export --format triton`: a Triton model repository whose configs parse as Triton's own ModelConfig message
and whose graphs run in onnxruntime with exactly the shapes and datatypes the configs declare."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from export.triton import TritonOptions, export_triton_repository
from fpet.errors import FpetError
from tests.helpers.servers import run_fpet

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="pip install 'tritonclient[grpc]'")
from google.protobuf import text_format  # noqa: E402

NUMPY = {model_config_pb2.TYPE_FP32: np.float32, model_config_pb2.TYPE_FP16: np.float16}


@pytest.fixture(scope="module")
def repository(tiny_bundles, tmp_path_factory):
    run = tiny_bundles["fpet"].parent / "run"  # the run the tiny bundles were exported from
    out = tmp_path_factory.mktemp("triton") / "repo"
    models = export_triton_repository(run, out, TritonOptions(task="tiny", max_batch_size=4), log=lambda _: None)
    return out, models


def parse(path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_layout_and_configs_parse_as_triton_model_config(repository):
    out, models = repository
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["backbone_tiny", "fpet_tiny"]
    for model in models:
        assert sorted(p.name for p in model.iterdir()) == ["1", "config.pbtxt", "fpet_manifest.json", "labels.txt"]
        config = parse(model / "config.pbtxt")
        assert config.name == model.name and config.platform == "onnxruntime_onnx" and config.max_batch_size == 4
        assert [(i.name, list(i.dims)) for i in config.input] == [("pixel_values", [3, 64, 64])]
        assert [(o.name, list(o.dims), o.label_filename) for o in config.output] == [
            ("logits", [3], "labels.txt"),
            ("probabilities", [3], "labels.txt"),
        ]
        assert config.dynamic_batching.max_queue_delay_microseconds == 2000
        assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_AUTO
        assert config.model_warmup[0].inputs["pixel_values"].zero_data
        assert not config.optimization.execution_accelerators.gpu_execution_accelerator
        assert (model / "labels.txt").read_text().splitlines() == ["a", "b", "c"]


def test_graphs_run_with_the_declared_shapes_and_match_the_bundles(repository, tiny_bundles):
    _, models = repository
    rng = np.random.default_rng(0)
    for model in models:
        config = parse(model / "config.pbtxt")
        session = ort.InferenceSession(str(model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        [declared] = config.input
        assert [i.name for i in session.get_inputs()] == [declared.name]
        assert sorted(o.name for o in session.get_outputs()) == sorted(o.name for o in config.output)
        bundle = ort.InferenceSession(
            str(tiny_bundles[model.name.split("_")[0]] / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        for batch in (1, config.max_batch_size):
            x = rng.standard_normal((batch, *declared.dims)).astype(NUMPY[declared.data_type])
            results = dict(
                zip(
                    [o.name for o in config.output],
                    session.run([o.name for o in config.output], {declared.name: x}),
                    strict=True,
                )
            )
            for output in config.output:
                assert results[output.name].shape == (batch, *output.dims)
                assert results[output.name].dtype == NUMPY[output.data_type]
            np.testing.assert_array_equal(results["logits"], bundle.run(None, {"input": x})[0])
            np.testing.assert_allclose(results["probabilities"].sum(1), 1.0, atol=1e-5)


def test_tensorrt_gpu_instances_and_a_second_export_replacing_the_first(repository, tiny_bundles):
    out, _ = repository
    run = tiny_bundles["fpet"].parent / "run"
    options = TritonOptions(task="tiny", tensorrt=True, instance_kind="gpu", instances=2, queue_delay_us=500)
    export_triton_repository(run, out, options, log=lambda _: None)
    config = parse(out / "fpet_tiny" / "config.pbtxt")
    [accelerator] = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP16"
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert config.instance_group[0].count == 2 and config.dynamic_batching.max_queue_delay_microseconds == 500
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_refusals_leave_things_as_they_were(tiny_bundles, tmp_path):
    run = tiny_bundles["fpet"].parent / "run"
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep")
    with pytest.raises(FpetError, match="not a repository fpet wrote"):
        export_triton_repository(run, precious, log=lambda _: None)
    assert [p.name for p in precious.iterdir()] == ["notes.txt"]
    with pytest.raises(FpetError, match="task name"):
        TritonOptions(task="../up")
    with pytest.raises(FpetError, match="instance kind"):
        TritonOptions(instance_kind="tpu")


def test_cli_writes_the_repository_or_one_error_line(tiny_bundles, tmp_path):
    run = tiny_bundles["fpet"].parent / "run"
    done = run_fpet(
        "export", str(run), "--out", str(tmp_path / "repo"), "--format", "triton", "--task", "t", home=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(tmp_path / "repo" / "fpet_t"), str(tmp_path / "repo" / "backbone_t")]
    assert json.loads((tmp_path / "repo" / ".fpet-triton.json").read_text())["models"] == ["fpet_t", "backbone_t"]
    done = run_fpet("export", str(run), "--out", str(tmp_path / "x"), "--format", "triton,onnx", home=tmp_path)
    assert done.returncode == 1 and done.stderr.strip().count("\n") == 0 and "give it alone" in done.stderr
    # --quantization reaches the Triton export too: static needs the run's data, which this run does not have
    done = run_fpet(
        "export",
        str(run),
        "--out",
        str(tmp_path / "int8"),
        "--format",
        "triton",
        "--precision",
        "int8",
        "--quantization",
        "static",
        home=tmp_path,
    )
    assert done.returncode == 1 and "static quantization needs calibration images" in done.stderr, done.stderr
