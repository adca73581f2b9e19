"""Real processes: the `fpet` command, and `fpet serve` on a free loopback port, waited for until ready."""

import os
import socket
import subprocess
import sys
import time

import httpx

from tests.helpers.images import jpeg


def run_fpet(*args, env=None, home):
    full_env = {**os.environ, "FPET_HOME": str(home), **(env or {})}
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, env=full_env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundles: dict, tmp_path, *extra: str, env: dict | None = None):
    port = free_port()
    log = open(tmp_path / f"serve-{port}.log", "w")  # noqa: SIM115 (the server process writes it while it runs)
    cmd = [
        sys.executable,
        "-m",
        "cli.main",
        "serve",
        "--port",
        str(port),
        "--providers",
        "cpu",
        "--threads",
        "1",
        "--bundle",
        str(bundles["fpet"]),
        "--bundle",
        str(bundles["backbone"]),
        *extra,
    ]
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return process, base
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    raise AssertionError((tmp_path / f"serve-{port}.log").read_text()[-3000:])


def classify(base: str, model: str = "fpet") -> int:
    return httpx.post(
        f"{base}/classify?model={model}", content=jpeg(), headers={"Content-Type": "image/jpeg"}, timeout=30
    ).status_code


def metric_value(text: str, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))
