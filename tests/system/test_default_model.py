"""The committed default model: it reloads on the real DINOv2 weights and exports into verified bundles."""

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from export.defaults import DEFAULT_RUN, ensure_default_bundles
from tests.helpers.servers import free_port, start_server

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.network


def test_default_model_is_committed_with_its_metrics():
    config = json.loads((DEFAULT_RUN / "config.json").read_text())
    metrics = json.loads((DEFAULT_RUN / "metrics.json").read_text())
    assert config["backbone"]["weights"] == "dinov2_vits14" and config["schedule"] == "6:0.5"
    assert metrics["test"]["last"]["n"] == 10000
    assert (DEFAULT_RUN / "adapters.safetensors").stat().st_size < 1_000_000


def test_default_bundles_build_from_the_committed_model(fetched, monkeypatch):
    home, _ = fetched
    monkeypatch.setenv("FPET_HOME", str(home))
    bundles = ensure_default_bundles(log=lambda _: None)
    for variant, path in bundles.items():
        manifest = json.loads((Path(path) / "manifest.json").read_text())
        assert manifest["variant"] == variant
        assert all(result["passed"] for result in manifest["verification"]["formats"].values())
        record = json.loads((home / "dinov2_vits14.json").read_text())
        assert manifest["backbone"]["tensors_sha256"] == record["tensors_sha256"]


def documented_block(marker: str) -> str:
    """The fenced code block after `<!-- checked by tests/system/test_default_model.py: MARKER -->` in
    docs/serving.md."""
    text = (ROOT / "docs" / "serving.md").read_text()
    after = text.split(f"<!-- checked by tests/system/test_default_model.py: {marker} -->", 1)[1]
    return after.split("```", 2)[1].split("\n", 1)[1]


@pytest.fixture(scope="module")
def default_server(fetched, tmp_path_factory, monkeypatch_module):
    """`fpet serve` on the default model's bundles, with gRPC on, as the documented clients find it (other ports)."""
    home, _ = fetched
    monkeypatch_module.setenv("FPET_HOME", str(home))
    bundles = ensure_default_bundles(log=lambda _: None)
    grpc_port = free_port()
    process, base = start_server(bundles, tmp_path_factory.mktemp("default"), "--grpc-port", str(grpc_port))
    yield base, grpc_port
    process.terminate()
    process.wait()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_the_readme_grpc_client_gets_classify_s_top_1(default_server):
    base, grpc_port = default_server
    code = documented_block("grpc-client").replace("127.0.0.1:8001", f"127.0.0.1:{grpc_port}")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    top = httpx.post(
        f"{base}/classify",
        content=(ROOT / "samples" / "ankle_boot.png").read_bytes(),
        headers={"Content-Type": "image/png"},
    ).json()["predictions"][0]
    first = done.stdout.split("' b'")[0]  # [[b'0.933624:9:Ankle boot' b'...
    assert first.endswith(f":{top['index']}:{top['label']}") and top["label"] == "Ankle boot"


def test_the_readme_perf_analyzer_commands_run_over_http_and_grpc(default_server):
    base, grpc_port = default_server
    if not (ROOT / ".tools" / "perf_analyzer" / "bin" / "perf_analyzer").is_file():
        pytest.skip("perf_analyzer is not installed: run `make tools` (needs apt-get install libb64-0d)")
    script = documented_block("perf-analyzer")
    script = script.replace("127.0.0.1:8000", base.removeprefix("http://")).replace(
        "127.0.0.1:8001", f"127.0.0.1:{grpc_port}"
    )
    script = script.replace(
        "--concurrency-range 4", "--concurrency-range 2 --measurement-interval 1000 --stability-percentage 100"
    )
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.count("Successful request count:") == 2 and "Avg gRPC time" in done.stdout
