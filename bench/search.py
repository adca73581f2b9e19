"""`fpet schedule search`: the merge schedule for a budget, chosen from measured latencies on this machine.

Candidates (FPET points at one, two or three blocks, and ToMe's every-block rates) are enumerated and pruned by
analytic GMACs: a schedule cannot be measured faster than its GMACs allow, so only those whose ideal speedup reaches
the budget are timed. The survivors nearest the budget (the least merging, which costs the least accuracy) are
exported and timed side by side with the plain backbone in the real runtime, interleaved, medians. Without training
the chosen schedule is the one that meets the budget with the most GMACs left; with `--data`, the most promising few
are trained briefly on the user's data and the most accurate (validation) within the budget is chosen.
"""

from __future__ import annotations

import itertools
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.model import make_runner, sample
from fpet.atomic import write_atomic, write_json_atomic
from fpet.config import get_config, grid_size
from fpet.cost import model_macs
from fpet.errors import FpetError
from fpet.pet import PetConfig
from fpet.runtimes import choose
from fpet.schedule import parse_schedule, plan
from fpet.vit import create_model


@dataclass(frozen=True)
class Budget:
    min_speedup: float | None = None
    max_gmacs: float | None = None

    def __post_init__(self) -> None:
        if (self.min_speedup is None) == (self.max_gmacs is None):
            raise FpetError("give one budget: --min-speedup X or --max-gmacs G")
        if self.min_speedup is not None and self.min_speedup <= 1:
            raise FpetError("--min-speedup must be above 1 (the plain backbone is 1)")

    def allows_ideal(self, ideal_speedup: float, gmacs: float) -> bool:
        if self.min_speedup is not None:
            return ideal_speedup >= self.min_speedup
        return gmacs <= self.max_gmacs

    def met_by(self, row: dict) -> bool:
        if self.min_speedup is not None:
            return row["speedup"] >= self.min_speedup
        return row["gmacs"] <= self.max_gmacs


def candidate_specs(depth: int) -> list[str]:
    """FPET at one block (a quarter or half of the tokens), at two or three blocks (half each), and ToMe's
    every-block rates; `plan` later drops those a model cannot run."""
    blocks = range(1, depth - 1)
    specs = [f"{b}:{a}" for b in blocks for a in (0.25, 0.5)]
    specs += ["+".join(f"{b}:0.5" for b in combo) for n in (2, 3) for combo in itertools.combinations(blocks, n)]
    return specs + [f"tome:{r}" for r in range(1, 17)]


def costed(backbone: str, img_size: int, method: str, num_classes: int) -> list[dict]:
    """Every candidate the model can run, with its GMACs and ideal speedup over no merging."""
    cfg = get_config(backbone)
    grid = grid_size(img_size, cfg.patch_size)
    pet = PetConfig(method)

    def gmacs(spec: str) -> float:
        return model_macs(cfg, grid, plan(parse_schedule(spec), cfg.depth, grid), pet, num_classes) / 1e9

    base = gmacs("none")
    rows = []
    for spec in candidate_specs(cfg.depth):
        try:
            g = gmacs(spec)
        except FpetError:  # more merging than the tokens allow at this size
            continue
        rows.append({"schedule": parse_schedule(spec).spec, "gmacs": g, "ideal_speedup": base / g})
    return rows


def shortlist(rows: list[dict], budget: Budget, n: int) -> list[dict]:
    """The n to time: within the budget by GMACs, those with the most GMACs left first, then a spread of the rest
    (measured speedups fall short of the ideal, so some margin must be timed too)."""
    pool = sorted((r for r in rows if budget.allows_ideal(r["ideal_speedup"], r["gmacs"])), key=lambda r: -r["gmacs"])
    if not pool:
        raise FpetError("no schedule reaches this budget even in GMACs: relax it")
    head, rest = pool[: n // 2], pool[n // 2 :]
    step = max(1, len(rest) // max(1, n - len(head)))
    return (head + rest[::step])[:n]


def between(pool: list[dict], timed: list[dict], budget: Budget, n: int) -> list[dict]:
    """Untimed schedules with more GMACs than the best one that met the budget but fewer than the closest miss:
    where a less lossy schedule that still meets it can be."""
    hits = [r["gmacs"] for r in timed if budget.met_by(r)]
    misses = [r["gmacs"] for r in timed if not budget.met_by(r) and r["gmacs"] > max(hits, default=float("inf"))]
    if not hits or not misses or n < 1:
        return []
    seen = {r["schedule"] for r in timed}
    band = sorted(
        (r for r in pool if max(hits) < r["gmacs"] < min(misses) and r["schedule"] not in seen),
        key=lambda r: -r["gmacs"],
    )
    step = max(1, len(band) // n)
    return [dict(r) for r in band[::step][:n]]


def measure(
    backbone: str,
    img_size: int,
    method: str,
    specs: list[str],
    runtime: str,
    batch_size: int,
    repeats: int,
    min_seconds: float,
    threads: int,
    log: Callable[[str], None],
) -> dict[str, float]:
    """Median ms per image of each schedule (and `none`), timed side by side in the real runtime."""
    torch.set_num_threads(threads)
    cfg = get_config(backbone)
    x = torch.rand(batch_size, 3, img_size, img_size)
    device = torch.device("cpu")
    # OpenVINO at the precision the service would use on this CPU (bf16 on a matrix engine)
    precision = choose("openvino").precision if runtime == "openvino" else "fp32"
    runners = {}
    with tempfile.TemporaryDirectory(prefix="fpet-search-") as tmp:
        for spec in ["none", *specs]:
            torch.manual_seed(0)
            model = create_model(cfg, num_classes=10, img_size=img_size, method=method, schedule=spec)
            runners[spec] = make_runner(model.freeze_for_deployment(), runtime, x, Path(tmp), device, precision)
            runners[spec](x)  # warm-up
        log(
            f"timing {len(runners)} schedules in {runtime} {precision}, batch {batch_size}, {repeats} interleaved "
            "rounds ..."
        )
        samples: dict[str, list[float]] = {spec: [] for spec in runners}
        for _ in range(repeats):
            for spec, run in runners.items():
                elapsed, runs = sample(run, x, min_seconds)
                samples[spec].append(1000 * elapsed / (runs * batch_size))
    return {spec: statistics.median(values) for spec, values in samples.items()}


def read_run(run: Path) -> tuple[str, int, str, int, dict]:
    """Backbone, image size, method, class count and training settings of a trained run: its candidates are timed
    and trained as it was."""
    from training.checkpoint import read_config

    config = read_config(run)
    backbone, img_size = config["backbone"]["name"], config["preprocessing"]["img_size"]
    return backbone, img_size, config["method"], len(config["labels"]), config["train"]


def candidate_trainer(settings: dict, data: str, out: Path, epochs: int) -> Callable[[str], float]:
    """Trains a candidate schedule briefly with the quick-training settings (a probe head and lr 2e-3, so a few
    epochs start from a working classifier) and gives its last validation accuracy. `settings`: a run's training
    settings, or the backbone, weights and split sizes to use."""
    from training.config import TrainConfig
    from training.loop import train

    def trained(spec: str) -> float:
        config = {
            **settings,
            "data": data,
            "out": str(out / spec.replace(":", "_").replace("+", "-")),
            "schedule": spec,
            "epochs": epochs,
            "warmup_epochs": min(settings.get("warmup_epochs", 1), max(epochs // 5, 1)),
            "eval_every": epochs,
            "test": False,
            "resume": False,
            "head_init": "probe",
            "lr": 2e-3,
        }
        if not config.get("val_size"):
            raise FpetError("choosing by accuracy needs validation images: give --val-size above 0")
        return train(TrainConfig(**config), log=lambda _: None)["val"]["last"]

    return trained


def search(
    backbone: str,
    img_size: int,
    budget: Budget,
    *,
    method: str = "adaptformer",
    num_classes: int = 10,
    runtime: str = "onnx",
    batch_size: int = 8,
    candidates: int = 8,
    repeats: int = 3,
    min_seconds: float = 0.3,
    threads: int = 2,
    train: Callable[[str], float] | None = None,
    train_top: int = 3,
    log: Callable[[str], None] = print,
) -> dict:
    """Rows for every timed schedule and the chosen one (None when no measured schedule meets the budget)."""
    start = time.monotonic()
    pool = costed(backbone, img_size, method, num_classes)
    rows = shortlist(pool, budget, candidates)

    def timed(batch: list[dict]) -> float:
        times = measure(
            backbone,
            img_size,
            method,
            [r["schedule"] for r in batch],
            runtime,
            batch_size,
            repeats,
            min_seconds,
            threads,
            log,
        )
        for row in batch:
            row["ms_per_image"] = times[row["schedule"]]
            row["speedup"] = times["none"] / row["ms_per_image"]  # against no merging timed in the same round
        return times["none"]

    baseline = timed(rows)
    refine = between(pool, rows, budget, candidates // 2)
    if refine:  # a second round in the GMACs band between the best miss and the best hit
        timed(refine)
        rows += refine
    meeting = sorted((r for r in rows if budget.met_by(r)), key=lambda r: (-r["gmacs"], -r["speedup"]))
    if train is not None:
        for row in meeting[:train_top]:
            log(f"training {row['schedule']} ...")
            row["accuracy"] = train(row["schedule"])
        trained = [r for r in meeting if "accuracy" in r]
        meeting = sorted(trained, key=lambda r: (-r["accuracy"], -r["speedup"])) + meeting[len(trained) :]
    rows.sort(key=lambda r: -r["speedup"])
    return {
        "backbone": backbone,
        "img_size": img_size,
        "method": method,
        "runtime": runtime,
        "batch_size": batch_size,
        "budget": {"min_speedup": budget.min_speedup, "max_gmacs": budget.max_gmacs},
        "baseline_ms_per_image": baseline,
        "seconds": round(time.monotonic() - start, 1),
        "rows": rows,
        "chosen": meeting[0] if meeting else None,
    }


def markdown(result: dict) -> str:
    trained = any("accuracy" in r for r in result["rows"])
    chosen = result["chosen"]["schedule"] if result["chosen"] else None
    lines = [
        f"Backbone {result['backbone']} at {result['img_size']} px, {result['runtime']}, batch {result['batch_size']}: "
        f"no merging takes {result['baseline_ms_per_image']:.2f} ms per image.",
        "",
        "| schedule | GMACs | ms/image | speedup | ideal | " + ("val accuracy | " if trained else "") + "chosen |",
        "|---|---|---|---|---|" + ("---|" if trained else "") + "---|",
    ]
    for r in result["rows"]:
        accuracy = (f"{100 * r['accuracy']:.2f}% | " if "accuracy" in r else "- | ") if trained else ""
        mark = "**yes**" if r["schedule"] == chosen else ""
        lines.append(
            f"| `{r['schedule']}` | {r['gmacs']:.3f} | {r['ms_per_image']:.2f} | {r['speedup']:.2f}x | "
            f"{r['ideal_speedup']:.2f}x | {accuracy}{mark} |"
        )
    if chosen is None:
        lines += ["", "No timed schedule met the budget: relax it or time more candidates (`--candidates`)."]
    return "\n".join(lines) + "\n"


def pareto_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in result["rows"] if "accuracy" in r]
    fig, axes = plt.subplots(1, 2 if trained else 1, figsize=(11 if trained else 6, 4.5), squeeze=False)
    ax = axes[0][0]
    for r in result["rows"]:
        chosen = result["chosen"] and r["schedule"] == result["chosen"]["schedule"]
        ax.scatter(r["gmacs"], r["speedup"], color="tab:red" if chosen else "tab:blue", zorder=3)
        ax.annotate(r["schedule"], (r["gmacs"], r["speedup"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if result["budget"]["min_speedup"]:
        ax.axhline(result["budget"]["min_speedup"], color="grey", linestyle="--", label="budget")
    if result["budget"]["max_gmacs"]:
        ax.axvline(result["budget"]["max_gmacs"], color="grey", linestyle="--", label="budget")
    ax.set(xlabel="GMACs per image", ylabel="measured speedup over no merging", title="speed")
    ax.grid(alpha=0.3)
    if trained:
        ax = axes[0][1]
        for r in trained:
            ax.scatter(r["speedup"], 100 * r["accuracy"], color="tab:green", zorder=3)
            ax.annotate(
                r["schedule"],
                (r["speedup"], 100 * r["accuracy"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        ax.set(xlabel="measured speedup", ylabel="validation accuracy (%)", title="accuracy")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def write_results(result: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "schedules.json", result)
    write_atomic(out / "schedules.md", lambda tmp: tmp.write_text(markdown(result)))
    pareto_plot(result, out / "pareto.png")
    return [out / "schedules.json", out / "schedules.md", out / "pareto.png"]
