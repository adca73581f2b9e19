"""Which runtime and precision a machine gets, and OpenVINO sessions as the service and the benchmarks use them."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from fpet.errors import FpetError
from fpet.runtimes import Choice, OpenVinoSession, choose, cpu_features, supports

SAPPHIRE_RAPIDS = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx512f", "avx2")
ZEN4 = ("avx512_bf16", "avx512_vnni", "avx512f", "avx2")  # AMD EPYC 9004: bf16 and VNNI without AMX
HASWELL = ("avx2",)


def test_cpu_features_come_from_the_kernels_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f amx_tile amx_bf16 avx512_vnni\n\nflags : x\n")
    assert cpu_features(cpuinfo) == ("amx_bf16", "avx512_vnni", "avx512f", "avx2")
    assert cpu_features(tmp_path / "missing") == ()
    assert supports("bf16", ("avx512_bf16",)) and not supports("bf16", HASWELL) and supports("fp32", ())


@pytest.mark.parametrize(
    ("features", "openvino", "gpu", "expected"),
    [
        (SAPPHIRE_RAPIDS, True, False, ("openvino", "bf16")),  # the CPU's matrix engine
        (ZEN4, True, False, ("openvino", "bf16")),  # AVX512-BF16 without AMX: still about 2x onnxruntime's fp32
        (HASWELL, True, False, ("onnxruntime", "fp32")),  # no bf16 in hardware: the fastest fp32 path
        (SAPPHIRE_RAPIDS, False, False, ("onnxruntime", "fp32")),  # OpenVINO not installed
        (SAPPHIRE_RAPIDS, True, True, ("onnxruntime", "fp32")),  # a GPU: onnxruntime's CUDA provider
    ],
)
def test_auto_takes_openvino_bf16_where_the_cpu_has_a_bf16_matrix_engine(features, openvino, gpu, expected):
    choice = choose(features=features, openvino=openvino, gpu=gpu)
    assert (choice.runtime, choice.precision) == expected and choice.reason


def test_asked_for_runtimes_and_precisions_hold_or_say_why_not():
    assert choose(precision="fp32", features=SAPPHIRE_RAPIDS, openvino=True).runtime == "onnxruntime"
    assert choose("onnxruntime", features=SAPPHIRE_RAPIDS, openvino=True) == Choice("onnxruntime", "fp32", "asked for")
    assert choose("openvino", "fp32", features=HASWELL, openvino=True).precision == "fp32"
    assert choose("openvino", features=HASWELL, openvino=True).precision == "fp32"  # auto: what the CPU has
    assert choose(precision="bf16", features=SAPPHIRE_RAPIDS, openvino=True).runtime == "openvino"
    assert choose(bundle_precision="fp16", features=SAPPHIRE_RAPIDS, openvino=True) == Choice(
        "onnxruntime", "fp16", "an fp16 bundle"
    )
    assert choose("openvino", bundle_precision="int8", features=SAPPHIRE_RAPIDS, openvino=True).precision == "int8"
    # int8 bundles go where their form runs fastest: static QDQ to OpenVINO on AMX-INT8 or VNNI, dynamic to onnxruntime
    static = dict(bundle_precision="int8", quantization="static", openvino=True)
    assert choose(features=SAPPHIRE_RAPIDS, **static).runtime == "openvino"
    assert choose(features=ZEN4, **static).runtime == "openvino"
    assert choose(features=HASWELL, **static).runtime == "onnxruntime"
    assert choose(features=SAPPHIRE_RAPIDS, bundle_precision="int8", quantization="dynamic", openvino=True) == Choice(
        "onnxruntime", "int8", "an int8 bundle (dynamic)"
    )
    refused = [
        (dict(precision="bf16", features=HASWELL, openvino=True), "bf16 needs a CPU with AMX-BF16 or AVX512-BF16"),
        (dict(runtime="onnxruntime", precision="bf16"), "choose the openvino runtime"),
        (dict(runtime="openvino", openvino=False), "pip install openvino"),
        (dict(runtime="openvino", bundle_precision="fp16", openvino=True), "fp16 bundles are for GPUs"),
        (dict(runtime="openvino", precision="fp16", features=HASWELL, openvino=True), "AMX-FP16 or AVX512-FP16"),
        (dict(runtime="tensorflow"), "unknown runtime"),
        (dict(precision="fp8"), "unknown precision"),
    ]
    for kwargs, message in refused:
        with pytest.raises(FpetError, match=message):
            choose(**kwargs)


def test_openvino_sessions_answer_from_several_threads_as_from_one(tiny_bundles):
    session = OpenVinoSession(tiny_bundles["fpet"] / "model.onnx", "fp32", threads=2, streams=2)
    batches = [np.random.default_rng(i).standard_normal((2, 3, 64, 64), dtype=np.float32) for i in range(8)]
    alone = [session.run(["logits"], {"input": x})[0] for x in batches]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda x: session.run(["logits"], {"input": x})[0], batches))
    for a, b in zip(alone, together, strict=True):
        np.testing.assert_array_equal(a, b)
    logits, maps = session.run(None, {"input": batches[0]})
    assert logits.shape == (2, 3) and maps.dtype == np.int64 and maps.shape == (2, 1, 16)


def test_auto_lowers_only_graphs_that_keep_their_matching_in_fp32():
    from export.bundle import runtime_facts

    fpet = {"precision": "fp32", "schedule": "6:0.5", "merge_maps": {"output": "merge_maps"}, "bundle_format": 4}
    assert runtime_facts(fpet) == {"bundle_precision": "fp32", "quantization": None, "lowers_safely": True}
    older = {**fpet, "bundle_format": 2}  # its matching is a matrix product: OpenVINO's bf16 would lower it
    assert not runtime_facts(older)["lowers_safely"]
    assert runtime_facts({**older, "schedule": "none", "merge_maps": None})["lowers_safely"]  # nothing to match
    choice = choose(**runtime_facts(older), features=SAPPHIRE_RAPIDS, openvino=True)
    assert choice.runtime == "onnxruntime" and "re-export" in choice.reason
    assert choose("openvino", **runtime_facts(older), features=SAPPHIRE_RAPIDS, openvino=True).precision == "bf16"
    uint8 = {**fpet, "precision": "int8", "quantization": {"mode": "static", "activations": "uint8, calibrated"}}
    assert runtime_facts(uint8)["quantization"] == "static uint8"  # the QDQ OpenVINO runs slower than bf16
    assert choose(**runtime_facts(uint8), features=SAPPHIRE_RAPIDS, openvino=True).runtime == "onnxruntime"


def test_what_no_bundle_can_change_is_refused_before_serving():
    from fpet.runtimes import check_available

    check_available("auto", "auto", HASWELL)
    check_available("auto", "fp16", HASWELL)  # fp16 bundles on a GPU
    for runtime, precision, message in [
        ("onnxruntime", "bf16", "no bf16 kernels"),
        ("auto", "bf16", "AMX-BF16"),
        ("openvino", "fp16", "AMX-FP16"),
    ]:
        with pytest.raises(FpetError, match=message):
            check_available(runtime, precision, HASWELL)
    with pytest.raises(FpetError, match="leave precision at auto"):
        choose(precision="fp32", bundle_precision="int8", quantization="dynamic", openvino=True)
    with pytest.raises(FpetError, match="pip install openvino"):
        choose(precision="bf16", features=SAPPHIRE_RAPIDS, openvino=False)


def test_cuda_is_onnxruntimes_and_openvino_is_never_a_fallback_from_it(tiny_bundles, monkeypatch):
    import service.runtime
    from service.runtime import CPU, CUDA, ModelRunner

    with pytest.raises(FpetError, match="providers cuda are onnxruntime's"):
        ModelRunner(tiny_bundles["fpet"], providers="cuda", runtime="openvino")
    monkeypatch.setattr(service.runtime, "requested_providers", lambda choice: [CUDA, CPU])  # onnxruntime-gpu
    runner = ModelRunner(tiny_bundles["fpet"], providers="auto", runtime="openvino")
    assert runner.provider == "OpenVINO CPU" and not runner.fell_back
