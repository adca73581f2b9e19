"""Model control (explicit mode): the admin key, loads from folders and archives, a bad bundle refused while the old
version serves, unload, a task added at run time, and swaps under wrk's load with no failed request."""

import json
import shutil
import tarfile
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from bench.http import Case, run_wrk
from export.multitask import export_multitask, parse_tasks
from service.app import create_app
from service.settings import Settings
from tests.helpers.images import jpeg
from tests.helpers.servers import start_server
from tests.helpers.tiny import TASKS

ADMIN = {"Authorization": "Bearer admin-secret"}


def settings_for(bundles: list, **extra) -> Settings:
    return Settings(
        bundles=[str(b) for b in bundles],
        providers="cpu",
        runtime="onnxruntime",
        max_batch_size=2,
        model_control_mode="explicit",
        admin_key="admin-secret",
        **extra,
    )


@pytest.fixture
def client(tiny_bundles):
    with TestClient(create_app(settings_for([tiny_bundles["fpet"], tiny_bundles["backbone"]]))) as client:
        yield client


def index(client) -> dict:
    response = client.post("/v2/repository/index", headers=ADMIN)
    assert response.status_code == 200, response.text
    return {entry["name"]: entry for entry in response.json()}


def classify(client, model: str = "fpet"):
    return client.post(f"/models/{model}/classify", content=jpeg(), headers={"Content-Type": "image/jpeg"})


def metric(client, prefix: str) -> float:
    lines = client.get("/metrics").text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(prefix))


def copy_bundle(source, target, version: str):
    """The same graph under another bundle version, as a re-export of the model would be."""
    shutil.copytree(source, target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["version"] = version
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def test_the_endpoints_need_explicit_mode_and_the_admin_key(tiny_bundles, client):
    assert client.post("/v2/repository/index").status_code == 401
    wrong = client.post("/v2/repository/index", headers={"Authorization": "Bearer api-key"})
    assert wrong.status_code == 403 and wrong.json()["error_type"] == "forbidden"
    api_key_only = client.post("/v2/repository/models/fpet/unload", headers={"X-API-Key": "admin-secret"})
    assert api_key_only.status_code == 401 and classify(client).status_code == 200  # nothing was unloaded
    assert set(index(client)) == {"fpet", "backbone"}
    off = Settings(bundles=[str(tiny_bundles["fpet"])], providers="cpu", runtime="onnxruntime")
    with TestClient(create_app(off)) as plain:
        refused = plain.post("/v2/repository/models/fpet/load", headers=ADMIN, json={})
        assert refused.status_code == 403 and "--model-control-mode explicit" in refused.json()["error"]
    with pytest.raises(ValueError, match="FPET_ADMIN_KEY"):
        Settings(model_control_mode="explicit")


def test_a_new_version_from_an_archive_replaces_the_old_and_a_bad_bundle_changes_nothing(
    tiny_bundles, client, tmp_path
):
    old = index(client)["fpet"]
    assert old["state"] == "READY" and old["version"] == "1"
    names = (
        "model",
        "version",
        "backbone",
        "provider",
        "precision",
        "schedule",
        "runtime",
        "compute_precision",
        "cpu_features",
    )  # fpet_model_info's labels
    old_series = [f'{k}="{v}"' for k, v in zip(names, client.app.state.fpet.info_labels["fpet"], strict=True)]
    newer = copy_bundle(tiny_bundles["fpet"], tmp_path / "fpet", "0123456789ab")
    archive = tmp_path / "fpet.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(newer, arcname="fpet")
    loaded = client.post(
        "/v2/repository/models/fpet/load", headers=ADMIN, json={"parameters": {"uri": f"file://{archive}"}}
    )
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["bundle_version"] == "0123456789ab" and loaded.json()["warmup_seconds"] > 0
    answer = classify(client)
    assert answer.status_code == 200 and answer.json()["model_version"] == "0123456789ab"
    info = [line for line in client.get("/metrics").text.splitlines() if line.startswith("fpet_model_info{")]
    assert [line for line in info if 'model="fpet"' in line and 'version="0123456789ab"' in line]  # in service
    assert not [line for line in info if all(label in line for label in old_series)]  # the old one is gone

    broken = copy_bundle(tiny_bundles["fpet"], tmp_path / "broken", "badbadbadbad")
    (broken / "model.onnx").write_bytes(b"not an onnx graph")
    refused = client.post("/v2/repository/models/fpet/load", headers=ADMIN, json={"parameters": {"uri": str(broken)}})
    assert refused.status_code == 400 and refused.json()["error_type"] == "load_failed"
    entry = index(client)["fpet"]
    assert entry["state"] == "READY" and entry["bundle_version"] == "0123456789ab"
    assert "failed" in entry["reason"] and str(broken) in entry["reason"]
    assert classify(client).json()["model_version"] == "0123456789ab"  # the serving version is untouched
    assert metric(client, 'fpet_model_loads_total{model="fpet",outcome="success"}') == 1
    assert metric(client, 'fpet_model_loads_total{model="fpet",outcome="failure"}') == 1
    missing = client.post("/v2/repository/models/other/load", headers=ADMIN, json={"parameters": {"uri": "/nowhere"}})
    assert missing.status_code == 400 and index(client)["other"]["state"] == "UNAVAILABLE"


def test_unload_then_load_again_under_any_name(tiny_bundles, client):
    assert client.post("/v2/repository/models/backbone/unload", headers=ADMIN).status_code == 200
    assert classify(client, "backbone").status_code == 404
    assert index(client)["backbone"] == {
        "name": "backbone",
        "version": "1",
        "state": "UNAVAILABLE",
        "reason": "unloaded",
    }
    assert [e["name"] for e in client.post("/v2/repository/index", headers=ADMIN, json={"ready": True}).json()] == [
        "fpet"
    ]
    assert client.post("/v2/repository/models/backbone/unload", headers=ADMIN).status_code == 404
    uri = {"parameters": {"uri": str(tiny_bundles["backbone"])}}
    for name in ("backbone", "reference"):
        assert client.post(f"/v2/repository/models/{name}/load", headers=ADMIN, json=uri).status_code == 200
        assert classify(client, name).status_code == 200
    again = client.post("/v2/repository/models/reference/load", headers=ADMIN)  # no URI: from where it was
    assert again.status_code == 200 and classify(client, "reference").status_code == 200
    bad_name = client.post("/v2/repository/models/..%2Fx/load", headers=ADMIN, json=uri)
    assert bad_name.status_code in (400, 404)


@pytest.fixture(scope="module")
def task_bundles(task_runs):
    """Multi-task bundles of the same backbone: two tasks, then re-exported with a third."""
    root, runs = task_runs
    specs = [f"{name}={run}" for name, run in runs.items()]
    export_multitask(parse_tasks(specs[:2]), root / "two", log=lambda _: None)
    export_multitask(parse_tasks(specs), root / "three", log=lambda _: None)
    return root / "two", root / "three"


def test_a_task_added_at_run_time(task_bundles):
    two, three = task_bundles
    with TestClient(create_app(settings_for([two]))) as client:
        assert [t["name"] for t in client.get("/tasks").json()["tasks"]] == ["shapes", "colours"]
        assert (
            client.post("/tasks/sizes/classify", content=jpeg(), headers={"Content-Type": "image/jpeg"}).status_code
            == 404
        )
        loaded = client.post("/v2/repository/models/fpet/load", headers=ADMIN, json={"parameters": {"uri": str(three)}})
        assert loaded.status_code == 200, loaded.text
        assert [t["name"] for t in client.get("/tasks").json()["tasks"]] == ["shapes", "colours", "sizes"]
        answer = client.post("/tasks/sizes/classify", content=jpeg(), headers={"Content-Type": "image/jpeg"})
        assert answer.status_code == 200 and answer.json()["predictions"][0]["label"] in TASKS["sizes"]
        assert client.get("/v2/models/sizes").status_code == 200  # the new task is an OIP model of its own


def test_swaps_under_load_fail_no_request(tiny_bundles, tmp_path):
    """wrk on both variants while the fpet model is swapped between two versions again and again."""
    versions = [copy_bundle(tiny_bundles["fpet"], tmp_path / f"v{i}", f"version{i:05d}") for i in range(2)]
    process, base = start_server(
        tiny_bundles, tmp_path, "--model-control-mode", "explicit", env={"FPET_ADMIN_KEY": "admin-secret"}
    )
    try:
        image = jpeg()
        cases = [
            Case("classify", model, f"{base}/models/{model}/classify", [image], {"Content-Type": "image/jpeg"})
            for model in ("fpet", "backbone")
        ]
        results, swaps = {}, []

        def load_wrk(case):
            folder = tmp_path / f"wrk-{case.model}"
            folder.mkdir()
            results[case.model] = run_wrk(case, 8, 8, folder)

        threads = [threading.Thread(target=load_wrk, args=(case,)) for case in cases]
        for thread in threads:
            thread.start()
        time.sleep(1)
        for i in range(6):
            started = time.perf_counter()
            done = httpx.post(
                f"{base}/v2/repository/models/fpet/load",
                headers=ADMIN,
                timeout=60,
                json={"parameters": {"uri": str(versions[i % 2])}},
            )
            assert done.status_code == 200, done.text
            swaps.append(time.perf_counter() - started)
        for thread in threads:
            thread.join()
        served = httpx.post(f"{base}/models/fpet/classify", content=image, headers={"Content-Type": "image/jpeg"})
        assert served.json()["model_version"] == "version00001"
        for model, result in results.items():
            print(f"{model}: {result['requests']} requests, {result['ok']} ok, errors {result['errors']}")
            assert result["requests"] > 0 and result["errors"] == {} and result["ok"] == result["requests"]
        print(f"swaps (load, warm-up, swap) in s: {', '.join(f'{s:.2f}' for s in swaps)}")
    finally:
        process.terminate()
        process.wait(30)
