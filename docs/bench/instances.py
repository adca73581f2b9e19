"""Model-only throughput at batch 8 for docs/benchmarks.md "Several instances per model": one session run by one
thread with onnxruntime's own threads (the service's default), against one session run by two threads at once with
one intra-op thread each (`fpet serve --instances 2`) or onnxruntime's own (`--instances 2 --threads 2` on two
cores). Sessions are made as the service makes them.

    .venv/bin/python docs/bench/instances.py   # after `make bundles`; pause anything else using the CPU
"""

import threading
import time

import numpy as np

from fpet.paths import default_bundle_dir
from fpet.sessions import create_session

BATCH = np.random.default_rng(0).standard_normal((8, 3, 112, 112), dtype=np.float32)


def images_per_second(variant: str, threads: int, callers: int, seconds: float = 6.0) -> float:
    session = create_session(default_bundle_dir(variant) / "model.onnx", threads=threads)
    feeds = {session.get_inputs()[0].name: BATCH}
    for _ in range(3):
        session.run(None, feeds)
    counts, stop = [0] * callers, time.perf_counter() + seconds

    def work(i: int) -> None:
        while time.perf_counter() < stop:
            session.run(None, feeds)
            counts[i] += len(BATCH)

    start = time.perf_counter()
    workers = [threading.Thread(target=work, args=(i,)) for i in range(callers)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(counts) / (time.perf_counter() - start)


if __name__ == "__main__":
    for round_ in range(3):
        for threads, callers in ((0, 1), (1, 2), (0, 2)):
            b, f = images_per_second("backbone", threads, callers), images_per_second("fpet", threads, callers)
            setup = f"threads={threads or 'default'} callers={callers}"
            print(f"round {round_} {setup}: backbone {b:.1f} fpet {f:.1f} img/s, ratio {f / b:.3f}", flush=True)
