"""CPU per answered request, per thread, for docs/benchmarks.md "Camera photos" (where a 1 MP request's CPU goes).

Reads user and system time of every thread of the given processes from /proc before and after a window, and the
requests the server answered in it from its /metrics; run it while `fpet bench http` keeps the server loaded:

    .venv/bin/fpet bench http --models fpet --concurrency 16 --duration 20 --image photo1mp.jpg &
    sleep 3; .venv/bin/python docs/bench/thread_cpu.py --pid $(pgrep -f "fpet serve") --pid $(pgrep -x wrk)

The server's main thread has the process's own id (the event loop); which other thread does what (onnxruntime's
two, the decode pool's) can be told by their share, or with `py-spy dump --pid PID`.
"""

import argparse
import os
import time
import urllib.request


def thread_seconds(pid: int) -> dict[str, float]:
    ticks = os.sysconf("SC_CLK_TCK")
    seconds = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended
        seconds[f"{pid}/{tid}"] = (int(fields[11]) + int(fields[12])) / ticks
    return seconds


def answered(metrics_url: str) -> float:
    with urllib.request.urlopen(metrics_url) as response:
        text = response.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("fpet_requests_total{"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pid", type=int, action="append", required=True, help="process to watch (repeat)")
    parser.add_argument("--seconds", type=float, default=13.0)
    parser.add_argument("--metrics", default="http://127.0.0.1:8000/metrics")
    args = parser.parse_args()
    before = {k: v for pid in args.pid for k, v in thread_seconds(pid).items()}
    first = answered(args.metrics)
    time.sleep(args.seconds)
    after = {k: v for pid in args.pid for k, v in thread_seconds(pid).items()}
    requests = answered(args.metrics) - first
    print(f"{requests:.0f} requests answered in {args.seconds:.0f} s")
    used = {k: after[k] - before[k] for k in after if k in before and after[k] > before[k]}
    for thread, seconds in sorted(used.items(), key=lambda kv: -kv[1]):
        print(f"{thread:>16}  {seconds / requests * 1000:6.2f} ms CPU per request")
    print(f"{'total':>16}  {sum(used.values()) / requests * 1000:6.2f} ms CPU per request")


if __name__ == "__main__":
    main()
