"""Many tasks on one backbone: adapter banks, the multi-task bundle and its verification, and serving it."""

import base64
import copy
import json

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from export.exporter import ExportOptions, export_bundle
from export.multitask import export_multitask, parse_tasks
from fpet.errors import FpetError
from fpet.multitask import stack_tasks
from fpet.vit import create_model
from service.app import create_app
from service.runtime import ModelRunner
from service.settings import Settings
from tests.helpers.images import encode
from tests.helpers.servers import run_fpet
from tests.helpers.tiny import TASKS, make_run


def tuned_models(classes: list[int], method: str = "adaptformer", schedule: str = "6:0.5") -> list:
    """Models of one random backbone with their own random adapters, refinements and heads."""
    torch.manual_seed(0)
    models = [
        create_model("vit_tiny_patch16_224", num_classes=c, img_size=32, method=method, schedule=schedule)
        for c in classes
    ]
    shared = {k: v for k, v in models[0].state_dict().items() if not any(p in k for p in ("adapter", "refine", "head"))}
    for model in models:
        model.load_state_dict(shared, strict=False)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(std=0.05)
    return [m.eval() for m in models]


@pytest.mark.parametrize("method", ["adaptformer", "adaptformer-1bit", "linear"])
def test_each_image_of_a_mixed_batch_gets_its_own_tasks_output(method):
    models = tuned_models([3, 2, 5], method)
    stacked = stack_tasks([copy.deepcopy(m).freeze_for_deployment() for m in models])
    x = torch.randn(7, 3, 32, 32)
    task = torch.tensor([2, 0, 1, 1, 2, 0, 2])
    with torch.no_grad():
        logits, maps = stacked.forward_explained(x, task)
        for i, t in enumerate(task.tolist()):
            own_logits, own_maps = models[t].forward_explained(x[i : i + 1])
            n = own_logits.shape[1]
            torch.testing.assert_close(logits[i, :n], own_logits[0], atol=1e-5, rtol=1e-5)
            assert torch.equal(maps[i], own_maps[0])  # the task's own refinement adapter chose the merges
            assert torch.all(logits[i, n:] == 0)  # padding of the narrower heads
    # the banks really differ by task: the same image under another task gives that task's answer
    with torch.no_grad():
        other = stacked(x[:1], torch.tensor([1]))[0, :2]
        torch.testing.assert_close(other, models[1](x[:1])[0], atol=1e-5, rtol=1e-5)


def test_tasks_of_different_backbones_or_schedules_are_refused():
    first, second = tuned_models([3, 3])
    with torch.no_grad():
        second.blocks[0].attn.qkv.weight.add_(0.01)
    with pytest.raises(FpetError, match=r"does not share task 0's backbone.*blocks\.0\.attn\.qkv\.weight"):
        stack_tasks([first.freeze_for_deployment(), second.freeze_for_deployment()])
    lora = tuned_models([3], method="lora")[0].freeze_for_deployment()
    with pytest.raises(FpetError, match="not lora"):
        stack_tasks([lora])


@pytest.fixture(scope="module")
def multitask_bundles(task_runs):
    root, runs = task_runs
    tasks = [f"{name}={run}" for name, run in runs.items()]
    for variant in ("fpet", "backbone"):
        done = run_fpet(
            "export", "--tasks", *tasks, "--variant", variant, "--out", str(root / f"mt-{variant}"), home=root
        )
        assert done.returncode == 0, done.stderr
    singles = {}
    for name, run in runs.items():
        singles[name] = root / f"single-{name}"
        export_bundle(run, singles[name], ExportOptions(formats=("onnx",)), log=lambda _: None)
    return {"fpet": root / "mt-fpet", "backbone": root / "mt-backbone"}, singles


def test_the_bundle_lists_its_tasks_and_passed_verification_alone_and_mixed(multitask_bundles, task_runs):
    bundles, _ = multitask_bundles
    manifest = json.loads((bundles["fpet"] / "manifest.json").read_text())
    assert [t["name"] for t in manifest["tasks"]] == list(TASKS) and manifest["num_classes"] == 5
    assert [t["num_classes"] for t in manifest["tasks"]] == [3, 2, 5]
    assert all(t["source_run"]["sha256"] and t["adapter_bytes"] > 0 for t in manifest["tasks"])
    check = manifest["verification"]
    assert check["passed"] and set(check["tasks"]) == set(TASKS) and check["mixed_batch"]["passed"]
    assert all(r["max_abs_error"] < 1e-4 for r in check["mixed_batch"]["tasks"].values())
    assert all(r["merge_maps_identical"] == 1.0 for r in check["mixed_batch"]["tasks"].values())
    assert json.loads((bundles["fpet"] / "labels.json").read_text()) == {k: list(v) for k, v in TASKS.items()}
    backbone = json.loads((bundles["backbone"] / "manifest.json").read_text())
    assert backbone["schedule"] == "none" and backbone["merge_maps"] is None and backbone["verification"]["passed"]


@pytest.mark.parametrize(("runtime", "atol"), [("onnxruntime", 1e-4), ("openvino", 1e-2)])  # openvino: bf16 here
def test_the_graph_gives_what_each_tasks_own_bundle_gives(multitask_bundles, runtime, atol):
    bundles, singles = multitask_bundles
    multi = ModelRunner(bundles["fpet"], providers="cpu", runtime=runtime)
    x = np.random.default_rng(0).normal(size=(6, 3, multi.img_size, multi.img_size)).astype(np.float32)
    tasks = np.array([0, 1, 2, 2, 1, 0])
    mixed = multi.run(x, tasks)
    for i, t in enumerate(tasks):
        task = multi.tasks[list(TASKS)[t]]
        own = ModelRunner(singles[task.name], providers="cpu", runtime=runtime).run(x[i : i + 1])[0]
        np.testing.assert_allclose(mixed[i, : len(task.labels)], own, atol=atol)
    with pytest.raises(ValueError, match="needs its images' tasks"):
        multi.run(x)
    for wrong in ([-1, 0, 1, 2, 1, 0], [1], [0, 1, 2, 3, 1, 0]):  # the graph would wrap -1, spread [1] over the batch
        with pytest.raises(ValueError, match=r"each image needs one of 0\.\.2"):
            multi.run(x, np.array(wrong))


def test_runs_that_cannot_share_a_graph_are_refused_naming_the_difference(task_runs, tmp_path):
    _, runs = task_runs
    weights = runs["shapes"].parent / "backbone.safetensors"
    other = make_run(tmp_path / "unmerged", schedule="none", weights=weights)
    with pytest.raises(FpetError, match="differ in merge schedule"):
        export_multitask(parse_tasks([str(runs["shapes"]), f"u={other}"]), tmp_path / "out", log=lambda _: None)
    small = make_run(tmp_path / "small", img_size=32, weights=weights)
    done = run_fpet(
        "export", "--tasks", str(runs["shapes"]), f"s={small}", "--out", str(tmp_path / "out"), home=tmp_path
    )
    assert done.returncode != 0 and "differ in preprocessing" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
    for bad, message in ((["a=x", "a=y"], "given twice"), (["fpet=x"], "variant's name"), (["a b=x"], "task name")):
        with pytest.raises(FpetError, match=message):
            parse_tasks(bad)


def test_verification_refuses_a_graph_whose_banks_are_in_the_wrong_order(task_runs, tmp_path, monkeypatch):
    import export.multitask

    _, runs = task_runs
    monkeypatch.setattr(export.multitask, "stack_tasks", lambda models: stack_tasks(models[::-1]))
    tasks = parse_tasks([f"{name}={run}" for name, run in runs.items()])
    with pytest.raises(FpetError, match=r"verification failed for shapes \(max abs error .*\), sizes \("):
        export_multitask(tasks, tmp_path / "wrong", log=lambda _: None)
    assert not (tmp_path / "wrong").exists()


@pytest.fixture(scope="module", params=["onnxruntime", "openvino"])
def client(request, multitask_bundles):
    bundles, _ = multitask_bundles
    settings = Settings(
        bundles=[str(bundles["fpet"]), str(bundles["backbone"])],
        providers="cpu",
        max_batch_size=4,
        runtime=request.param,
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        client.runtime = request.param
        yield client


def photo(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "PNG")


def test_each_task_answers_as_its_own_bundle_does(client, multitask_bundles):
    _, singles = multitask_bundles
    low = client.get("/models/fpet").json()["compute_precision"] == "bf16"
    for name, labels in TASKS.items():
        single = TestClient(create_app(Settings(bundles=[str(singles[name])], providers="cpu", runtime=client.runtime)))
        with single:
            for seed in range(3):
                body = photo(seed)
                own = single.post("/classify", content=body, headers={"Content-Type": "image/png"}).json()
                got = client.post(f"/tasks/{name}/classify", content=body, headers={"Content-Type": "image/png"})
                assert got.status_code == 200, got.text
                result = got.json()
                assert result["task"] == name and {p["label"] for p in result["predictions"]} == set(labels)
                assert result["predictions"][0]["label"] == own["predictions"][0]["label"]
                tolerance = 1e-2 if low else 1e-4
                assert result["predictions"][0]["score"] == pytest.approx(own["predictions"][0]["score"], abs=tolerance)
                same = client.post(f"/classify?task={name}", content=body, headers={"Content-Type": "image/png"})
                assert same.json()["predictions"] == result["predictions"]
        backbone = client.post(
            f"/tasks/{name}/classify?model=backbone", content=photo(0), headers={"Content-Type": "image/png"}
        )
        assert backbone.status_code == 200 and backbone.json()["model"] == "backbone"


def test_task_routes_errors_listing_and_metrics(client):
    png = {"Content-Type": "image/png"}
    missing = client.post("/classify", content=photo(0), headers=png)
    assert missing.status_code == 400 and "serves several tasks" in missing.json()["error"]
    unknown = client.post("/tasks/nope/classify", content=photo(0), headers=png)
    assert unknown.status_code == 404 and unknown.json()["error_type"] == "task_not_found"
    listed = client.get("/tasks").json()["tasks"]
    assert [t["name"] for t in listed] == list(TASKS) and all(t["models"] == ["fpet", "backbone"] for t in listed)
    assert client.get("/models/fpet/labels?task=colours").json() == ["x", "y"]
    meta = client.get("/models/fpet").json()
    assert meta["tasks"] == list(TASKS) and meta["classes"] == 5
    assert client.get("/v2/models/sizes").json()["outputs"][0]["shape"] == [-1, 5]
    assert client.get("/v2/models/sizes/ready").json() == {"name": "sizes", "ready": True}  # as tritonclient asks
    compare = client.post("/classify/compare?task=colours", content=photo(1), headers=png).json()
    assert set(compare["models"]) == {"fpet", "backbone"}
    assert all(len(e["predictions"]) == 2 for e in compare["models"].values())
    explained = client.post("/models/fpet/explain?task=sizes", content=photo(1), headers=png).json()
    assert len(explained["predictions"]) == 5 and explained["merges"]
    data = [base64.b64encode(photo(2)).decode()]
    oip = {
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": data}],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 1}}],
    }
    answer = client.post("/v2/models/colours/infer", json=oip)
    assert answer.status_code == 200, answer.text
    assert answer.json()["model_name"] == "colours" and answer.json()["outputs"][0]["data"][0].split(":")[2] in "xy"
    config = client.get("/v2/models/colours/config").json()
    assert config["name"] == "colours" and [o["dims"] for o in config["output"]] == [[2], [2]]
    assert client.get("/v2/models/fpet/config").status_code == 404  # several tasks: each is a model of its own
    (colours,) = client.get("/v2/models/colours/stats").json()["model_stats"]
    assert colours["inference_stats"]["success"]["count"] >= 1 and colours["inference_count"] >= 1
    assert {s["name"] for s in client.get("/v2/models/stats").json()["model_stats"]} == {*TASKS}
    metrics = client.get("/metrics").text
    assert 'fpet_task_requests_total{code="200",model="fpet",task="shapes"}' in metrics
    assert 'fpet_task_requests_total{code="200",model="fpet",task="colours"}' in metrics


def task_counts(base: str) -> dict[str, float]:
    metrics = httpx.get(f"{base}/metrics").text
    line = 'fpet_task_requests_total{{code="200",model="fpet",task="{}"}} '
    return {task: float(metrics.split(line.format(task))[1].split()[0]) for task in TASKS}


def test_load_and_memory_benchmarks_on_a_real_server(multitask_bundles, tmp_path):
    """A mixed-task load really reaches every task (wrk's request rotation), and the memory benchmark measures a
    real server that answered every task."""
    from bench.http import bench_http, summary
    from bench.memory import bench_memory, free_port, parse_case, start, wait_ready

    bundles, _ = multitask_bundles
    image = tmp_path / "image.png"
    image.write_bytes(photo(3))
    port, log = free_port(), tmp_path / "server.log"
    server = start((bundles["fpet"],), port, log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(server, base, log)
        for client in ("wrk", "python"):
            before = task_counts(base)
            rows = bench_http(base, [image], [2], 1.0, ["fpet"], client=client, tasks=list(TASKS))
            assert [r["route"] for r in rows] == ["task shapes", "3 tasks mixed"]
            assert all(r["ok"] > 0 and not r["errors"] for r in rows), rows
            assert "3 tasks mixed / task shapes goodput" in summary(rows)
            after = task_counts(base)
            assert all(after[task] > before[task] for task in TASKS), (client, before, after)
    finally:
        server.terminate()
        server.wait(60)
    [row] = bench_memory([parse_case(f"multi={bundles['fpet']}")], image, tmp_path / "logs")
    assert row["tasks"] == 3 and row["servers"] == 1 and 0 < row["pss_mib"] <= row["rss_mib"]
    with pytest.raises(FpetError, match="NAME=BUNDLE"):
        parse_case("no-bundles")


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_int8_and_fp16_multitask_bundles_are_verified_per_task_and_check_themselves(task_runs, precision):
    root, runs = task_runs
    out = root / f"mt-{precision}"
    done = run_fpet(
        "export",
        "--tasks",
        *[f"{n}={r}" for n, r in runs.items()],
        "--precision",
        precision,
        "--out",
        str(out),
        home=root,
    )
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == precision and manifest["bundle_format"] == 7
    assert set(manifest["verification"]["tasks"]) == set(TASKS) and manifest["verification"]["passed"]
    if precision == "int8":
        assert manifest["quantization"]["mode"] == "dynamic"
    assert manifest["verification"]["selfcheck"]["passed"]
    runner = ModelRunner(out, providers="cpu", runtime="onnxruntime")
    assert runner.self_check(8)["passed"] and runner.self_check(8)["compute_precision"] == precision
    with np.load(out / "selfcheck.npz") as check:
        assert sorted(set(check["task"].tolist())) == list(range(len(TASKS)))
        classes = [int(check["classes"][check["task"] == t][0]) for t in range(len(TASKS))]
        assert classes == [len(v) for v in TASKS.values()]
    settings = Settings(bundles=[str(out)], providers="cpu", runtime="onnxruntime")
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").status_code == 200
        for name, labels in TASKS.items():
            answer = client.post(f"/tasks/{name}/classify", content=photo(1), headers={"Content-Type": "image/png"})
            assert answer.status_code == 200 and answer.json()["predictions"][0]["label"] in labels
