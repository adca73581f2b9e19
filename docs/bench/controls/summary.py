"""The controls of docs/results.md ("Recipes and controls"): per-seed test accuracy (last epoch and best-val
checkpoint) of every group of runs, and paired tests between groups on the same 10,000 test images.

    .venv/bin/python docs/bench/controls/summary.py > docs/bench/controls/summary.md

Groups whose runs are not all there yet are listed with what exists; paired tests need all seeds of both sides.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from fpet.describe import describe
from training.checkpoint import read_test_correct
from training.paired import mcnemar, paired_bootstrap

ROOT = Path(__file__).resolve().parents[3]
DATA = "/usr/share/datasets/fashion-mnist"
SEEDS = "models/seeds"


def seeds(name: str, first: str | None = None) -> list[str]:
    """A group's run folders for seeds 0, 1, 2 (seed 0 may live elsewhere)."""
    return [first or f"{SEEDS}/{name}_seed0", f"{SEEDS}/{name}_seed1", f"{SEEDS}/{name}_seed2"]


GROUPS = {
    "AdaptFormer, 112 px": seeds("fashion_mnist_adaptformer", "models/fashion_mnist_adaptformer"),
    "AdaptFormer, 98 px": seeds("fashion_mnist_adaptformer98"),
    "AdaptFormer, 84 px": seeds("fashion_mnist_adaptformer84"),
    "AdaptFormer + ToMe, same GMACs as 6:0.5": seeds(
        "fashion_mnist_adaptformer_tome", "models/fashion_mnist_adaptformer_tome"
    ),
    "FPET 6:0.5, paper recipe": seeds("fashion_mnist_fpet_adaptformer"),
    "FPET 6:0.5, warm start + distillation": seeds("fashion_mnist_fpet_warm"),
    "FPET 6:0.5, warm start 10 epochs + distillation": seeds(
        "fashion_mnist_fpet_warm10", "models/fashion_mnist_fpet_adaptformer"
    ),
    "FPET 3:0.5, warm start + distillation": seeds("fashion_mnist_fpet15_warm"),
    "FPET 3:0.5,4:0.5, paper recipe": seeds("fashion_mnist_fpet18_adaptformer"),
    "FPET 3:0.5,4:0.5, warm start + distillation": seeds("fashion_mnist_fpet18_warm"),
    "FPET 5:0.5,7:0.5, warm start + distillation": seeds("fashion_mnist_fpet_5-7_warm"),
    "FPET 5:0.5,7:0.5, warm start 10 epochs + distillation": seeds("fashion_mnist_fpet_5-7_warm10"),
    "FPET 5:0.5,7:0.5, warm start 15 epochs + distillation": seeds("fashion_mnist_fpet_5-7_warm15"),
    "FPET 4:0.5,5:0.5, warm start + distillation": seeds("fashion_mnist_fpet_4-5_warm"),
    "FPET 3:0.5,7:0.5, warm start + distillation": seeds("fashion_mnist_fpet_3-7_warm"),
    "FPET 3:0.5,7:0.5, warm start 10 epochs + distillation": seeds("fashion_mnist_fpet_3-7_warm10"),
}

PAIRS = [
    ("FPET 6:0.5, warm start + distillation", "AdaptFormer, 112 px"),
    ("FPET 6:0.5, warm start + distillation", "AdaptFormer, 98 px"),
    ("FPET 6:0.5, warm start + distillation", "AdaptFormer + ToMe, same GMACs as 6:0.5"),
    ("FPET 6:0.5, warm start + distillation", "FPET 6:0.5, paper recipe"),
    ("FPET 6:0.5, warm start 10 epochs + distillation", "AdaptFormer, 112 px"),
    ("FPET 6:0.5, warm start 10 epochs + distillation", "AdaptFormer, 98 px"),
    ("FPET 6:0.5, warm start 10 epochs + distillation", "AdaptFormer + ToMe, same GMACs as 6:0.5"),
    ("FPET 6:0.5, warm start 10 epochs + distillation", "AdaptFormer, 84 px"),
    ("FPET 6:0.5, warm start 10 epochs + distillation", "FPET 6:0.5, warm start + distillation"),
    ("AdaptFormer, 98 px", "AdaptFormer, 112 px"),
    ("FPET 3:0.5, warm start + distillation", "AdaptFormer, 112 px"),
    ("FPET 3:0.5,4:0.5, warm start + distillation", "AdaptFormer, 112 px"),
    ("FPET 3:0.5,4:0.5, warm start + distillation", "AdaptFormer, 84 px"),
    ("FPET 5:0.5,7:0.5, warm start 10 epochs + distillation", "AdaptFormer, 112 px"),
    ("FPET 5:0.5,7:0.5, warm start 10 epochs + distillation", "AdaptFormer, 84 px"),
    ("FPET 5:0.5,7:0.5, warm start 10 epochs + distillation", "FPET 3:0.5, warm start + distillation"),
    ("FPET 5:0.5,7:0.5, warm start 15 epochs + distillation", "AdaptFormer, 112 px"),
    ("FPET 5:0.5,7:0.5, warm start 15 epochs + distillation", "AdaptFormer, 84 px"),
    ("FPET 5:0.5,7:0.5, warm start 15 epochs + distillation", "FPET 5:0.5,7:0.5, warm start 10 epochs + distillation"),
    ("FPET 3:0.5,7:0.5, warm start 10 epochs + distillation", "AdaptFormer, 112 px"),
    ("FPET 3:0.5,7:0.5, warm start 10 epochs + distillation", "AdaptFormer, 84 px"),
    ("FPET 3:0.5,7:0.5, warm start 10 epochs + distillation", "FPET 3:0.5,4:0.5, warm start + distillation"),
]

# Recipes picked by their seed-0 test accuracy: seeds 1 and 2 alone are the check that was not used to pick them.
CHOSEN_ON_SEED_0 = {
    "FPET 6:0.5, warm start 10 epochs + distillation",
    "FPET 5:0.5,7:0.5, warm start 10 epochs + distillation",
    "FPET 3:0.5,7:0.5, warm start 10 epochs + distillation",
}


def pooled(pairs: list[tuple[list[bool], list[bool]]]) -> tuple[str, str]:
    """The bootstrap's difference and its 95% interval, as printed."""
    result = paired_bootstrap(pairs)
    low, high = result["ci95_points"]
    return f"{result['difference_points']:+.2f}", f"[{low:+.2f}, {high:+.2f}]"


def finished(run: str) -> bool:
    return (ROOT / run / "test_correct.json").is_file() and (ROOT / run / "metrics.json").is_file()


def accuracies(run: str) -> tuple[float, float, int]:
    test = json.loads((ROOT / run / "metrics.json").read_text())["test"]
    best = test["best_val_checkpoint"]
    return test["last"]["accuracy"], best["accuracy"], best["epoch"]


def gmacs(run: str) -> float:
    config = json.loads((ROOT / run / "config.json").read_text())
    found = describe(
        config["backbone"]["name"],
        method=config["method"],
        schedule=config["schedule"],
        img_size=config["preprocessing"]["img_size"],
        num_classes=len(config["labels"]),
    )
    return found["gmacs"]


def main() -> None:
    print("| runs | GMACs | last epoch: seed 0, 1, 2 | mean (std) | best-val checkpoint: seed 0, 1, 2 | mean |")
    print("|---|---|---|---|---|---|")
    for name, runs in GROUPS.items():
        done = [run for run in runs if finished(run)]
        if not done:
            continue
        rows = [accuracies(run) for run in done]
        last, best = [100 * r[0] for r in rows], [100 * r[1] for r in rows]
        spread = f" ({statistics.stdev(last):.2f})" if len(last) > 1 else ""
        missing = "" if len(done) == len(runs) else f" ({len(done)} of {len(runs)} seeds)"
        best_cells = ", ".join(f"{x:.2f} (ep {r[2]})" for x, r in zip(best, rows, strict=True))
        print(
            f"| {name}{missing} | {gmacs(done[0]):.3f} | {', '.join(f'{x:.2f}' for x in last)} | "
            f"**{statistics.mean(last):.2f}**{spread} | {best_cells} | {statistics.mean(best):.2f} |"
        )
    print()
    print(
        "| A vs B | per seed: only A right / only B right, McNemar p | A - B per seed | pooled, bootstrap 95% "
        "| seeds 1, 2 only, where A was picked on seed 0 |"
    )
    print("|---|---|---|---|---|")
    for a_name, b_name in PAIRS:
        a_runs, b_runs = GROUPS[a_name], GROUPS[b_name]
        if not all(finished(run) for run in a_runs + b_runs):
            continue
        pairs = [
            (read_test_correct(ROOT / a, DATA), read_test_correct(ROOT / b, DATA))
            for a, b in zip(a_runs, b_runs, strict=True)
        ]
        tests = [mcnemar(a, b) for a, b in pairs]
        diffs = [100 * (sum(a) - sum(b)) / len(a) for a, b in pairs]
        difference, interval = pooled(pairs)
        unseen = " ".join(pooled(pairs[1:])) if a_name in CHOSEN_ON_SEED_0 else ""
        print(
            f"| {a_name} vs {b_name} | "
            + "; ".join(f"{t['only_a_right']} / {t['only_b_right']}, p = {t['p_value']:.2g}" for t in tests)
            + f" | {', '.join(f'{d:+.2f}' for d in diffs)} | **{difference}** {interval} | {unseen} |"
        )


if __name__ == "__main__":
    main()
