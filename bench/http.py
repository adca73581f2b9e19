"""Load on a running service, side by side: the same images to each variant and route at several concurrencies,
from a native load generator (wrk, else hey) so that the client does not starve the server of the CPU it measures.

Each case is closed-loop for a fixed duration. Routes: `classify` (the encoded image to /classify), `oip-image` (the
same bytes as an Open Inference Protocol BYTES input) and `oip-pixels` (preprocessed by the client, FP32
`pixel_values`), both OIP kinds as Triton's binary tensor data, as `tritonclient` sends them. Cases alternate order
at every concurrency. Besides latency and throughput, the server's CPU seconds per request come from its own
`process_cpu_seconds_total` (one worker; multiprocess mode has no process metrics).
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from PIL import Image

from fpet.errors import FpetError
from fpet.imaging import normalize, resize_rgb
from service.decode import sniff
from service.oip import serialize_bytes

ROUTES = ("classify", "oip-image", "oip-pixels")
CLIENTS = ("auto", "wrk", "hey", "python")


@dataclass(frozen=True)
class Case:
    route: str
    model: str
    url: str
    bodies: list[bytes]
    headers: dict[str, str]
    paths: tuple[str, ...] = ()  # when set, request i goes to paths[i % len(paths)] (tasks of a multi-task model)

    def url_for(self, i: int) -> str:
        if not self.paths:
            return self.url
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}{self.paths[i % len(self.paths)]}"


def oip_body(name: str, datatype: str, shape: list[int], raw: bytes) -> tuple[bytes, str]:
    head = json.dumps(
        {
            "inputs": [
                {"name": name, "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": len(raw)}}
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return head + raw, str(len(head))


def make_case(base: str, route: str, model: str, images: list[bytes]) -> Case:
    """Request bodies are built before the clock starts: a client that preprocesses does it ahead of time."""
    if route == "classify":
        kind = sniff(images[0]) or "png"
        return Case(route, model, f"{base}/classify?model={model}", images, {"Content-Type": f"image/{kind}"})
    url = f"{base}/v2/models/{model}/infer"
    if route == "oip-image":
        built = [oip_body("image", "BYTES", [1], serialize_bytes([image])) for image in images]
    elif route == "oip-pixels":
        pre = httpx.get(f"{base}/v2/models/{model}", timeout=30).json()["preprocessing"]
        built = []
        for image in images:
            x = normalize(resize_rgb(Image.open(io.BytesIO(image)), pre["img_size"])[None], pre["mean"], pre["std"])
            built.append(oip_body("pixel_values", "FP32", list(x.shape), x.astype("<f4").tobytes()))
    else:
        raise FpetError(f"unknown route {route!r}; choose from {', '.join(ROUTES)}")
    if len({length for _, length in built}) != 1:
        raise FpetError("OIP bodies for several images need headers of one length: give images of one size")
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": built[0][1]}
    return Case(route, model, url, [body for body, _ in built], headers)


def task_cases(base: str, model: str, tasks: list[str], images: list[bytes]) -> list[Case]:
    """A multi-task model under load for its first task alone, and for all `tasks` in turn (mixed batches)."""
    headers = {"Content-Type": f"image/{sniff(images[0]) or 'png'}"}
    paths = tuple(f"/tasks/{task}/classify?model={model}" for task in tasks)
    single = Case(f"task {tasks[0]}", model, f"{base}{paths[0]}", images, headers)
    return [single, Case(f"{len(tasks)} tasks mixed", model, f"{base}{paths[0]}", images, headers, paths)]


def pick_client(client: str) -> str:
    if client != "auto":
        if client != "python" and shutil.which(client) is None:
            raise FpetError(f"{client} is not installed (Debian: apt-get install {client})")
        return client
    for name in ("wrk", "hey"):
        if shutil.which(name):
            return name
    raise FpetError("no native load generator: apt-get install wrk (or hey), or pass --client python")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


WRK_SCRIPT = """
local bodies, n = {}, 0
for _, path in ipairs({%(paths)s}) do
  local f = assert(io.open(path, "rb")); n = n + 1; bodies[n] = f:read("*all"); f:close()
end
local paths = {%(routes)s}
wrk.method = "POST"
%(headers)s
-- Every request is formatted once, in init (after wrk has set Host): formatting a photo-sized body per request
-- would be client CPU taken from the server on a shared machine.
local requests, k = {}, 0
function init(args)
  local routes = #paths > 0 and paths or {false}
  local cycle = n
  while cycle %% #routes ~= 0 do cycle = cycle + n end  -- one full turn of bodies and routes rotating together
  for r = 1, cycle do
    local path = routes[(r - 1) %% #routes + 1] or nil
    requests[r] = wrk.format(nil, path, nil, bodies[(r - 1) %% n + 1])
  end
end
function request()
  k = k %% #requests + 1
  return requests[k]
end
counts = {}
function response(status) counts[status] = (counts[status] or 0) + 1 end
local threads = {}
function setup(thread) table.insert(threads, thread) end
function done(summary, latency, requests)
  local statuses = {}
  for _, t in ipairs(threads) do
    for status, c in pairs(t:get("counts")) do statuses[#statuses + 1] = string.format('"%%d": %%d', status, c) end
  end
  local e = summary.errors
  io.write(string.format('FPET_RESULT {"requests": %%d, "seconds": %%f, "p50_ms": %%f, "p95_ms": %%f, ' ..
    '"p99_ms": %%f, "socket_errors": {"connect": %%d, "read": %%d, "write": %%d, "timeout": %%d}, ' ..
    '"statuses": [{%%s}]}\\n', summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3,
    latency:percentile(95) / 1e3, latency:percentile(99) / 1e3, e.connect, e.read, e.write, e.timeout,
    table.concat(statuses, ", ")))
end
"""


def run_wrk(case: Case, concurrency: int, seconds: float, folder: Path) -> dict:
    paths = []
    for i, body in enumerate(case.bodies):
        path = folder / f"body-{i}.bin"
        path.write_bytes(body)
        paths.append(json.dumps(str(path)))
    headers = "\n".join(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in case.headers.items())
    script = folder / "case.lua"
    routes = ", ".join(json.dumps(path) for path in case.paths)
    script.write_text(WRK_SCRIPT % {"paths": ", ".join(paths), "routes": routes, "headers": headers})
    cmd = [
        "wrk",
        "-t1",
        f"-c{concurrency}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "30s",
        "-s",
        str(script),
        case.url,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    line = next((x for x in done.stdout.splitlines() if x.startswith("FPET_RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise FpetError(f"wrk failed: {(done.stderr or done.stdout).strip()[-300:]}")
    raw = json.loads(line.removeprefix("FPET_RESULT "))
    statuses: dict[str, int] = {}
    for part in raw["statuses"]:
        for status, count in part.items():
            statuses[status] = statuses.get(status, 0) + count
    errors = {k: v for k, v in statuses.items() if k != "200"}
    errors.update({name: n for name, n in raw["socket_errors"].items() if n})
    return {
        "requests": raw["requests"],
        "ok": statuses.get("200", 0),
        "errors": errors,
        "seconds": raw["seconds"],
        "p50_ms": raw["p50_ms"],
        "p95_ms": raw["p95_ms"],
        "p99_ms": raw["p99_ms"],
    }


def run_hey(case: Case, concurrency: int, seconds: float, folder: Path) -> dict:
    if case.paths:
        raise FpetError("hey sends to one URL: mixed-task load needs wrk (apt-get install wrk) or --client python")
    body = folder / "body.bin"
    body.write_bytes(case.bodies[0])  # hey sends one body
    headers = [arg for k, v in case.headers.items() if k != "Content-Type" for arg in ("-H", f"{k}: {v}")]
    cmd = [
        "hey",
        "-z",
        f"{max(1, round(seconds))}s",
        "-c",
        str(concurrency),
        "-m",
        "POST",
        "-T",
        case.headers["Content-Type"],
        *headers,
        "-D",
        str(body),
        "-t",
        "30",
        case.url,
    ]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise FpetError(f"hey failed: {done.stderr.strip()[-300:]}")
    return {**parse_hey(done.stdout), "seconds": elapsed}


def parse_hey(text: str) -> dict:
    """hey's summary, not its CSV: the CSV lists only the requests that got an answer, so refused connections and
    timeouts would vanish from the error count. Socket errors are named as wrk names them."""
    statuses: dict[str, int] = {}
    for code, n in re.findall(r"^\s*\[(\d{3})\]\s+(\d+) responses", text, re.M):
        statuses[code] = statuses.get(code, 0) + int(n)
    errors = {k: v for k, v in statuses.items() if k != "200"}
    errors_at = text.find("Error distribution:")
    for n, message in re.findall(r"^\s*\[(\d+)\]\s+(.*)$", text[errors_at:] if errors_at >= 0 else "", re.M):
        low = message.lower()
        kind = (
            "timeout"
            if "timeout" in low or "deadline exceeded" in low
            else "connect"
            if "dial tcp" in low
            else "read"
            if "eof" in low or "reset" in low or "read" in low
            else "write"
            if "write" in low
            else "other"
        )
        errors[kind] = errors.get(kind, 0) + int(n)
    latency = {int(p): 1000 * float(v) for p, v in re.findall(r"^\s*(\d+)% in ([\d.]+) secs", text, re.M)}
    return {
        "requests": sum(statuses.values()) + sum(v for k, v in errors.items() if not k.isdigit()),
        "ok": statuses.get("200", 0),
        "errors": errors,
        "p50_ms": latency.get(50, math.nan),
        "p95_ms": latency.get(95, math.nan),
        "p99_ms": latency.get(99, math.nan),
    }


async def run_python_async(case: Case, concurrency: int, seconds: float) -> dict:
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    end = time.perf_counter() + seconds

    async def worker(client: httpx.AsyncClient, offset: int) -> None:
        i = offset
        while time.perf_counter() < end:
            start = time.perf_counter()
            try:
                body = case.bodies[i % len(case.bodies)]
                response = await client.post(case.url_for(i), content=body, headers=case.headers)
                code = str(response.status_code)
            except httpx.TransportError as exc:
                code = type(exc).__name__
            latencies.append(time.perf_counter() - start)
            statuses[code] = statuses.get(code, 0) + 1
            i += 1

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency)) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client, k) for k in range(concurrency)))
        elapsed = time.perf_counter() - start
    ms = [1000 * x for x in latencies]
    return {
        "requests": len(latencies),
        "ok": statuses.get("200", 0),
        "seconds": elapsed,
        "errors": {k: v for k, v in statuses.items() if k != "200"},
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "p99_ms": percentile(ms, 99),
    }


STAGES = ("decode", "preprocess", "queue", "inference")


def server_counters(base: str, model: str) -> dict[str, float]:
    """The server's CPU seconds and, per stage, the summed seconds and count of its histograms."""
    found = {}
    for line in httpx.get(f"{base}/metrics", timeout=30).text.splitlines():
        if line.startswith("process_cpu_seconds_total "):
            found["cpu"] = float(line.split()[1])
        for stage in STAGES:
            for part in ("sum", "count"):
                if line.startswith(f'fpet_stage_duration_seconds_{part}{{model="{model}",stage="{stage}"}} '):
                    found[f"{stage}_{part}"] = float(line.split()[1])
    return found


def settle(base: str, limit_s: float = 30.0) -> None:
    """Wait until the server has finished what the client left behind when it stopped, so that work is charged to
    this case rather than to the next one's CPU reading."""
    end = time.perf_counter() + limit_s
    while time.perf_counter() < end:
        text = httpx.get(f"{base}/metrics", timeout=30).text
        busy = sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith(("fpet_requests_in_flight{", "fpet_queue_images{"))
        )
        if busy == 0:
            return
        time.sleep(0.05)


def run_case(case: Case, concurrency: int, seconds: float, client: str, base: str) -> dict:
    before = server_counters(base, case.model)
    with tempfile.TemporaryDirectory(prefix="fpet-bench-") as folder:
        if client == "wrk":
            result = run_wrk(case, concurrency, seconds, Path(folder))
        elif client == "hey":
            result = run_hey(case, concurrency, seconds, Path(folder))
        else:
            result = asyncio.run(run_python_async(case, concurrency, seconds))
    settle(base)
    after = server_counters(base, case.model)
    cpu_ms = None
    if "cpu" in before and "cpu" in after and result["requests"]:
        cpu_ms = 1000 * (after["cpu"] - before["cpu"]) / result["requests"]
    stages_ms = {}
    for stage in STAGES:
        count = after.get(f"{stage}_count", 0) - before.get(f"{stage}_count", 0)
        if count:
            stages_ms[stage] = 1000 * (after[f"{stage}_sum"] - before.get(f"{stage}_sum", 0)) / count
    return {
        "route": case.route,
        "model": case.model,
        "concurrency": concurrency,
        "client": client,
        **result,
        "throughput_rps": result["requests"] / result["seconds"],
        "goodput_rps": result["ok"] / result["seconds"],
        "server_cpu_ms_per_request": cpu_ms,
        "stages_ms": stages_ms,
    }


def bench_http(
    base: str,
    images: list[Path],
    concurrencies: list[int],
    seconds: float,
    models: list[str],
    routes: tuple[str, ...] = ("classify",),
    client: str = "auto",
    repeats: int = 1,
    tasks: list[str] | None = None,
) -> list[dict]:
    """One row per case and concurrency: medians over `repeats` rounds, the cases' order alternating every round so
    that machine drift and position hit every case alike; `rounds` keeps each round's figures. With `tasks` (a
    multi-task model), the cases are its first task alone and all the tasks in turn, per model."""
    client = pick_client(client)
    payloads = [path.read_bytes() for path in images]
    if tasks:
        cases = [case for model in models for case in task_cases(base, model, tasks, payloads)]
    else:
        cases = [make_case(base, route, model, payloads) for route in routes for model in models]
    rows = []
    for c in concurrencies:
        run_case(cases[0], c, min(seconds, 1.0), client, base)  # warm connections and caches, untimed
        rounds: dict[int, list[dict]] = {i: [] for i in range(len(cases))}
        for r in range(repeats):
            order = list(enumerate(cases))
            if (r + c) % 2 == 0:
                order.reverse()
            for i, case in order:
                rounds[i].append(run_case(case, c, seconds, client, base))
        rows += [median_row(rounds[i]) for i in range(len(cases))]
    return rows


def median_row(rounds: list[dict]) -> dict:
    first = rounds[0]
    medians = {
        key: statistics.median(r[key] for r in rounds)
        for key in ("p50_ms", "p95_ms", "p99_ms", "throughput_rps", "goodput_rps", "seconds")
    }
    cpu = [r["server_cpu_ms_per_request"] for r in rounds if r["server_cpu_ms_per_request"] is not None]
    errors: dict[str, int] = {}
    for r in rounds:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    stages = {
        stage: statistics.median(r["stages_ms"][stage] for r in rounds if stage in r["stages_ms"])
        for stage in STAGES
        if any(stage in r["stages_ms"] for r in rounds)
    }
    return {
        "route": first["route"],
        "model": first["model"],
        "concurrency": first["concurrency"],
        "client": first["client"],
        "repeats": len(rounds),
        **medians,
        "requests": sum(r["requests"] for r in rounds),
        "ok": sum(r["ok"] for r in rounds),
        "errors": errors,
        "server_cpu_ms_per_request": statistics.median(cpu) if cpu else None,
        "stages_ms": stages,
        "rounds": [{k: r[k] for k in ("goodput_rps", "throughput_rps", "p50_ms")} for r in rounds],
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| route | model | conc. | requests | 200 | errors | p50 ms | p95 ms | p99 ms | req/s | goodput/s "
        "| server CPU ms/req | decode / preprocess / queue / inference ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(r["errors"].items())) or "0"
        cpu = "n/a" if r["server_cpu_ms_per_request"] is None else f"{r['server_cpu_ms_per_request']:.1f}"
        lines.append(
            f"| {r['route']} | {r['model']} | {r['concurrency']} | {r['requests']} | {r['ok']} | {errors} | "
            f"{r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['throughput_rps']:.1f} | "
            f"{r['goodput_rps']:.1f} | {cpu} | {' / '.join(stage_ms(r, stage) for stage in STAGES)} |"
        )
    return "\n".join(lines) + "\n"


def stage_ms(row: dict, stage: str) -> str:
    value = row["stages_ms"].get(stage)
    return "-" if value is None else f"{value:.1f}"


def summary(rows: list[dict]) -> str:
    """The fpet/backbone goodput ratio per route and concurrency (of the medians, and per round), when both ran;
    for task cases, the mixed/single goodput ratio per model."""
    by = {(r["route"], r["concurrency"], r["model"]): r for r in rows}
    lines = []
    for model, c in sorted({(r["model"], r["concurrency"]) for r in rows}):
        single = next(
            (r for r in rows if (r["model"], r["concurrency"]) == (model, c) and r["route"][:5] == "task "), None
        )
        mixed = next((r for r in rows if (r["model"], r["concurrency"]) == (model, c) and "mixed" in r["route"]), None)
        if single and mixed and single["goodput_rps"]:
            pairs = zip(mixed["rounds"], single["rounds"], strict=True)
            per_round = ", ".join(f"{m['goodput_rps'] / s['goodput_rps']:.3f}" for m, s in pairs if s["goodput_rps"])
            ratio = mixed["goodput_rps"] / single["goodput_rps"]
            lines.append(
                f"{model} at {c}: {mixed['route']} / {single['route']} goodput {ratio:.3f} (rounds: {per_round})"
            )
    for route, c in sorted({(r["route"], r["concurrency"]) for r in rows}):
        fpet, backbone = by.get((route, c, "fpet")), by.get((route, c, "backbone"))
        if fpet and backbone and backbone["goodput_rps"]:
            pairs = zip(fpet["rounds"], backbone["rounds"], strict=True)
            per_round = ", ".join(f"{f['goodput_rps'] / b['goodput_rps']:.3f}" for f, b in pairs if b["goodput_rps"])
            ratio = fpet["goodput_rps"] / backbone["goodput_rps"]
            lines.append(f"{route} at {c}: fpet/backbone goodput {ratio:.3f} (rounds: {per_round})")
    return "\n".join(lines) + ("\n" if lines else "")
