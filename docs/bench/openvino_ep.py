"""OpenVINO through onnxruntime's OpenVINO execution provider against the OpenVINO Python API, on the CPU.

The service runs OpenVINO through its own API (fpet.runtimes.OpenVinoSession); the EP (PyPI `onnxruntime-openvino`)
would put it behind onnxruntime's interface like the other runtimes. This measures what that costs: ms per image of
the backbone and fpet bundles on both, bf16 and fp32, one stream of 2 threads each, in interleaved rounds (~0.3 s per
configuration, in a rotated order) so that drift on a shared machine hits all alike; then compile time, and whether
the two agree on logits and merge maps for 64 random images. It needs a venv without plain onnxruntime, since
`onnxruntime-openvino` ships its own `onnxruntime` module (and its own OpenVINO libraries):

    python3 -m venv /tmp/ortov-venv && /tmp/ortov-venv/bin/pip install onnxruntime-openvino openvino numpy
    /tmp/ortov-venv/bin/python docs/bench/openvino_ep.py --batch-sizes 1,8,32 --rounds 9

The EP takes bf16 only through `load_config`: unset it computes f32 (OpenVINO's own default here is bf16), and its
`precision` option allows only FP32 or ACCURACY on the CPU; an option it rejects makes onnxruntime drop the EP with a
warning and run the graph on its CPU EP, which these sessions refuse, so every number is OpenVINO's for the whole graph.
"""

import argparse
import itertools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import openvino as ov

THREADS = 2
HINTS = {"bf16": "bf16", "fp32": "f32"}
MODELS = ("backbone", "fpet")
Runner = Callable[[np.ndarray], list[np.ndarray]]
Key = tuple[str, str, str]  # runtime, precision, model


def openvino_api(path: Path, precision: str) -> Runner:
    """The service's way: one infer request, outputs copied out since the request reuses its buffers."""
    config = {"INFERENCE_PRECISION_HINT": HINTS[precision], "NUM_STREAMS": 1, "INFERENCE_NUM_THREADS": THREADS}
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()
    return lambda x: [np.array(v) for v in request.infer({"input": x}).values()]


def openvino_ep(path: Path, precision: str) -> Runner:
    """The same OpenVINO settings through the EP's load_config, with a session that fails rather than fall back."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # no node is left to onnxruntime's pool: its threads would only compete
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    config = {"INFERENCE_PRECISION_HINT": HINTS[precision], "NUM_STREAMS": "1", "INFERENCE_NUM_THREADS": str(THREADS)}
    provider = {"device_type": "CPU", "load_config": json.dumps({"CPU": config})}
    session = ort.InferenceSession(
        str(path), options, providers=["OpenVINOExecutionProvider"], provider_options=[provider]
    )
    return lambda x: session.run(None, {"input": x})


RUNTIMES = {"openvino": openvino_api, "ort-openvino": openvino_ep}


def per_image_ms(run: Runner, x: np.ndarray, seconds: float) -> float:
    start, calls = time.perf_counter(), 0
    while (elapsed := time.perf_counter() - start) < seconds or calls == 0:
        run(x)
        calls += 1
    return elapsed * 1000 / calls / len(x)


def measure(runners: dict[Key, Runner], batch: int, rounds: int, seconds: float) -> dict[Key, list[float]]:
    """Interleaved rounds; the order rotates so no configuration always follows the same one."""
    x = np.random.default_rng(batch).standard_normal((batch, 3, 112, 112), dtype=np.float32)
    keys = list(runners)
    for key in keys:  # warm-up: first calls at a new batch size shape-infer and allocate
        per_image_ms(runners[key], x, seconds / 2)
    times: dict[Key, list[float]] = {key: [] for key in keys}
    for r in range(rounds):
        shift = r % len(keys)
        for key in keys[shift:] + keys[:shift]:
            times[key].append(per_image_ms(runners[key], x, seconds))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path.home() / ".cache/fpet/bundles/fashion_mnist_fpet_adaptformer"
    parser.add_argument("--bundles", type=Path, default=default, help="holds backbone/ and fpet/")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--seconds", type=float, default=0.3, help="per configuration and round")
    args = parser.parse_args()

    runners: dict[Key, Runner] = {}
    compile_s: dict[Key, float] = {}
    for key in itertools.product(RUNTIMES, HINTS, MODELS):
        start = time.perf_counter()
        runners[key] = RUNTIMES[key[0]](args.bundles / key[2] / "model.onnx", key[1])
        compile_s[key] = time.perf_counter() - start
    bundled = [p.name for p in Path(ort.__file__).parent.glob("capi/libopenvino.so.*.*")]  # the EP's own OpenVINO
    print(f"onnxruntime {ort.__version__} ({ort.get_device()}, {' '.join(bundled)}), openvino API {ov.get_version()}\n")

    print("| batch | runtime | precision | backbone ms/img (min-max) | fpet ms/img (min-max) | fpet speedup |")
    print("|---|---|---|---|---|---|")
    for batch in map(int, args.batch_sizes.split(",")):
        times = measure(runners, batch, args.rounds, args.seconds)
        for runtime, precision in itertools.product(RUNTIMES, HINTS):
            cells, medians = [], []
            for model in MODELS:
                t = times[runtime, precision, model]
                medians.append(statistics.median(t))
                noisy = " noisy" if (max(t) - min(t)) / medians[-1] > 0.15 else ""  # another job shared the cores
                cells.append(f"{medians[-1]:.2f} ({min(t):.2f}-{max(t):.2f}){noisy}")
            print(f"| {batch} | {runtime} | {precision} | {' | '.join(cells)} | {medians[0] / medians[1]:.2f}x |")

    print("\n| model | precision | compile s (openvino / ort-openvino) | logits max diff | same top-1 | same maps |")
    print("|---|---|---|---|---|---|")
    x = np.random.default_rng(64).standard_normal((64, 3, 112, 112), dtype=np.float32)
    for model, precision in itertools.product(MODELS, HINTS):
        a, b = (runners[runtime, precision, model](x) for runtime in RUNTIMES)
        agree = np.mean(a[0].argmax(1) == b[0].argmax(1))
        maps = f"{np.mean(a[1] == b[1]):.1%}" if len(a) > 1 else "-"  # fpet's merge_maps: which tokens merged
        seconds = " / ".join(f"{compile_s[runtime, precision, model]:.2f}" for runtime in RUNTIMES)
        print(f"| {model} | {precision} | {seconds} | {np.abs(a[0] - b[0]).max():.3g} | {agree:.1%} | {maps} |")


if __name__ == "__main__":
    main()
