"""What serving costs in memory and on disk: real `fpet serve` processes, each loaded, warmed and having answered
every task it serves, measured from /proc/PID/smaps_rollup. PSS splits pages shared between processes (libraries,
read-only files) fairly among them, so summing it over servers is the machine's cost; RSS counts them in full.

A case is one or more servers; each server serves one or more bundles. One multi-task bundle serving 1 and 20
tasks against one server per task (today's design) says what an extra task costs either way.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from export.bundle import read_manifest
from fpet.errors import FpetError

READY_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class MemoryCase:
    name: str
    servers: tuple[tuple[Path, ...], ...]  # the bundles of each server


def parse_case(text: str) -> MemoryCase:
    """`NAME=B1,B2;B3`: servers separated by ';', the bundles of one server by ','."""
    name, sep, spec = text.partition("=")
    servers = tuple(tuple(Path(b) for b in server.split(",") if b) for server in spec.split(";") if server)
    if not sep or not name or not servers or not all(servers):
        raise FpetError(f"a memory case is NAME=BUNDLE[,BUNDLE...][;BUNDLE...], got {text!r}")
    for bundle in {b for server in servers for b in server}:
        read_manifest(bundle)  # refuses what is not a bundle now, not after minutes of loading
    return MemoryCase(name, servers)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served_paths(bundles: tuple[Path, ...]) -> list[str]:
    """One classify path per task served (a multi-task bundle's tasks, else the variant itself)."""
    paths = []
    for bundle in bundles:
        manifest = read_manifest(bundle)
        variant = manifest["variant"]
        tasks = [t["name"] for t in manifest.get("tasks", [])]
        paths += [f"/tasks/{t}/classify?model={variant}" for t in tasks] or [f"/classify?model={variant}"]
    return paths


def smaps_kib(pid: int) -> dict[str, int]:
    found = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            found[key.lower()] = int(rest.split()[0])
    return found


def start(bundles: tuple[Path, ...], port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cli.main", "serve", "--port", str(port), "--providers", "cpu", "--workers", "1"]
    cmd += [arg for bundle in bundles for arg in ("--bundle", str(bundle))]
    with open(log, "wb") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=Path(__file__).resolve().parents[1]
        )


def wait_ready(process: subprocess.Popen, base: str, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FpetError(f"the server exited with {process.returncode}: {log.read_text()[-400:]}")
        try:
            if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise FpetError(f"the server at {base} was not ready after {READY_TIMEOUT_S:.0f} s")


def measure_case(case: MemoryCase, image: bytes, folder: Path) -> dict:
    """Start every server of the case, answer one request per task on each, then read each server's memory."""
    processes = []
    try:
        servers = []
        for i, bundles in enumerate(case.servers):
            port, log = free_port(), folder / f"{case.name}-{i}.log".replace(" ", "_")
            processes.append(start(bundles, port, log))
            wait_ready(processes[-1], f"http://127.0.0.1:{port}", log)
            servers.append((processes[-1], f"http://127.0.0.1:{port}", served_paths(bundles)))
        for _, base, paths in servers:
            for path in paths:
                answer = httpx.post(f"{base}{path}", content=image, headers={"Content-Type": "image/png"}, timeout=60)
                if answer.status_code != 200:
                    raise FpetError(f"{path} answered {answer.status_code}: {answer.text[:200]}")
        memory = [smaps_kib(process.pid) for process, _, _ in servers]
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
    bundles = {b.resolve() for server in case.servers for b in server}
    disk = sum(f.stat().st_size for b in bundles for f in b.iterdir() if f.is_file())
    return {
        "case": case.name,
        "servers": len(case.servers),
        "bundles": len(bundles),
        "tasks": sum(len(paths) for _, _, paths in servers),
        "disk_mb": disk / 1e6,
        "pss_mib": sum(m["pss"] for m in memory) / 1024,
        "rss_mib": sum(m["rss"] for m in memory) / 1024,
        "per_server_pss_mib": [m["pss"] / 1024 for m in memory],
    }


def bench_memory(cases: list[MemoryCase], image: Path, folder: Path) -> list[dict]:
    """One row per case, measured one case at a time; the servers' logs go to `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    payload = image.read_bytes()
    return [measure_case(case, payload, folder) for case in cases]


def markdown(rows: list[dict]) -> str:
    lines = ["| case | servers | tasks | bundles on disk MB | PSS MiB | RSS MiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['servers']} | {r['tasks']} | {r['disk_mb']:.1f} | {r['pss_mib']:.0f} | "
            f"{r['rss_mib']:.0f} |"
        )
    return "\n".join(lines) + "\n"
