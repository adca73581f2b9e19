"""Bundles that check themselves where they run: every export writes selfcheck.npz, and a served bundle whose logits
no longer match it (a tampered file, a swapped graph) is not ready, with a reason that names the self-check, while
the other models keep serving."""

import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient

from fpet import selfcheck
from fpet.errors import FpetError
from fpet.runtimes import cpu_features, supports
from service.app import create_app
from service.runtime import ModelRunner
from service.settings import Settings
from tests.helpers.images import jpeg

ADMIN = {"Authorization": "Bearer admin"}


def copy(bundle, target):
    shutil.copytree(bundle, target)
    return target


def tamper(bundle):
    """The reference logits changed in one image's top class: what a file damaged (or edited) in transit gives."""
    path = bundle / selfcheck.FILE
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    for name in ("logits", "exported"):
        arrays[name][0, arrays[name][0].argmax()] -= 50
    with path.open("wb") as f:
        np.savez(f, **arrays)


def served(bundles: list, **extra):
    settings = Settings(bundles=[str(b) for b in bundles], providers="cpu", runtime="onnxruntime", **extra)
    return TestClient(create_app(settings))


def classify(client, model):
    return client.post(f"/models/{model}/classify", content=jpeg(), headers={"Content-Type": "image/jpeg"})


def failures(client, model) -> float:
    line = next(
        x
        for x in client.get("/metrics").text.splitlines()
        if x.startswith(f'fpet_selfcheck_failures_total{{model="{model}"}}')
    )
    return float(line.split()[-1])


def test_every_export_carries_a_self_check_that_passes_where_it_was_made(tiny_bundles):
    for variant, bundle in tiny_bundles.items():
        runner = ModelRunner(bundle, providers="cpu", runtime="onnxruntime")
        manifest = runner.manifest
        assert manifest["bundle_format"] == 6 and (bundle / manifest["selfcheck"]["file"]).is_file()
        assert manifest["selfcheck"]["tolerances"]["fp32"]["max_abs_error"] == 1e-3
        assert manifest["verification"]["cpu_features"] == list(runner.cpu_features)
        result = runner.self_check(4)
        assert result["passed"] and result["images"] == manifest["selfcheck"]["images"], variant
        assert result["compute_precision"] == "fp32" and result["runtime"] == "onnxruntime"


@pytest.mark.parametrize("damage", ["tampered file", "swapped graph"])
def test_a_bundle_that_no_longer_matches_is_not_ready_and_the_others_serve(tiny_bundles, tmp_path, damage):
    fpet = copy(tiny_bundles["fpet"], tmp_path / "fpet")
    if damage == "tampered file":
        tamper(fpet)
    else:  # the backbone's graph under the fpet bundle's manifest: it runs, and computes another model
        shutil.copy(tiny_bundles["backbone"] / "model.onnx", fpet / "model.onnx")
    with served([fpet, tiny_bundles["backbone"]]) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "fpet: self-check failed" in ready.json()["error"]
        refused = classify(client, "fpet")
        assert refused.status_code == 503 and "self-check failed: max abs error" in refused.json()["error"]
        assert classify(client, "backbone").status_code == 200  # the other model keeps serving
        described = client.get("/models/fpet").json()
        assert described["ready"] is False and described["selfcheck"]["passed"] is False
        assert "cpu_features" in described["selfcheck"] and "CPU features" in described["not_ready_reason"]
        assert client.get("/models/backbone").json()["ready"] is True
        assert client.get("/v2/models/fpet/ready").status_code == 503
        assert client.get("/v2/models/backbone/ready").status_code == 200
        assert failures(client, "fpet") >= 1
        assert 'fpet_model_ready{model="fpet"} 0.0' in client.get("/metrics").text


def test_selfcheck_off_serves_anyway_counted(tiny_bundles, tmp_path):
    fpet = copy(tiny_bundles["fpet"], tmp_path / "fpet")
    tamper(fpet)
    with served([fpet, tiny_bundles["backbone"]], selfcheck="off") as client:
        before = failures(client, "fpet")
        assert client.get("/readyz").status_code == 200 and classify(client, "fpet").status_code == 200
        assert before >= 1 and client.get("/models/fpet").json()["selfcheck"]["passed"] is False


def test_model_control_refuses_a_bundle_whose_self_check_fails(tiny_bundles, tmp_path):
    fpet = copy(tiny_bundles["fpet"], tmp_path / "fpet")
    tamper(fpet)
    with served(
        [tiny_bundles["fpet"], tiny_bundles["backbone"]], model_control_mode="explicit", admin_key="admin"
    ) as client:
        loaded = client.post("/v2/repository/models/fpet/load", headers=ADMIN, json={"parameters": {"uri": str(fpet)}})
        assert loaded.status_code == 400 and "self-check failed" in loaded.json()["error"]
        assert client.get("/readyz").status_code == 200 and classify(client, "fpet").status_code == 200


def test_a_damaged_self_check_file_is_a_clear_error(tiny_bundles, tmp_path):
    fpet = copy(tiny_bundles["fpet"], tmp_path / "fpet")
    (fpet / selfcheck.FILE).write_bytes(b"not an npz archive")
    with pytest.raises(FpetError, match="is not a readable self-check"):
        selfcheck.read(fpet, ModelRunner(fpet, providers="cpu", runtime="onnxruntime").manifest, "fp32")
    with served([fpet, tiny_bundles["backbone"]]) as client:  # that model is not ready, and says why
        answer = client.get("/readyz")
        assert answer.status_code == 503 and "self-check failed" in answer.json()["error"]
        assert "not a readable self-check" in answer.json()["error"]
        assert classify(client, "backbone").status_code == 200


def test_the_bundles_own_precision_is_held_to_its_export_and_another_to_the_reference(tiny_bundles, tmp_path):
    """onnxruntime computing the fp32 bundle is compared with the graph's logits at export; OpenVINO computing it in
    bf16, with the reference model's. Only the reference's logits are moved here: only bf16 notices."""
    fpet = copy(tiny_bundles["fpet"], tmp_path / "fpet")
    path = fpet / selfcheck.FILE
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["logits"] += 5
    with path.open("wb") as f:
        np.savez(f, **arrays)
    fp32 = ModelRunner(fpet, providers="cpu", runtime="onnxruntime")
    assert fp32.self_check(4)["passed"]
    as_bf16 = selfcheck.check(lambda x, t: fp32.run(x, t), fpet, fp32.manifest, "bf16")  # judged as bf16 is
    assert not as_bf16["passed"] and as_bf16["max_abs_error"] >= 4
    if supports("bf16", cpu_features()):  # and OpenVINO's own bf16, where this CPU computes it
        bf16 = ModelRunner(fpet, providers="cpu", runtime="openvino", precision="bf16").self_check(4)
        assert not bf16["passed"] and bf16["compute_precision"] == "bf16" and bf16["max_abs_error"] >= 4
