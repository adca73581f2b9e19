"""`fpet schedule search`: candidates pruned by GMACs, timed for real, the choice within the budget."""

import json

import pytest

from bench.search import Budget, between, costed, shortlist
from fpet.errors import FpetError
from tests.helpers.servers import run_fpet
from tests.helpers.tiny import make_image_folder


def test_candidates_are_runnable_and_costed_against_no_merging():
    rows = costed("vit_small_patch14_dinov2", 112, "adaptformer", 10)
    specs = {r["schedule"] for r in rows}
    assert {"6:0.5", "3:0.5,6:0.5,9:0.5", "tome:4"} <= specs
    assert "tome:16" not in specs  # 12 blocks x 16 tokens is more than 64 patches hold
    assert all(r["ideal_speedup"] > 1 for r in rows)
    one = next(r for r in rows if r["schedule"] == "6:0.5")
    assert one["ideal_speedup"] == pytest.approx(1.30, abs=0.01)


def test_the_shortlist_stays_within_the_budget_and_starts_nearest_to_it():
    rows = costed("vit_small_patch14_dinov2", 112, "adaptformer", 10)
    picked = shortlist(rows, Budget(min_speedup=1.5), 8)
    assert len(picked) == 8 and all(r["ideal_speedup"] >= 1.5 for r in picked)
    assert picked[0]["gmacs"] == max(r["gmacs"] for r in rows if r["ideal_speedup"] >= 1.5)
    assert all(r["gmacs"] <= 0.9 for r in shortlist(rows, Budget(max_gmacs=0.9), 5))
    with pytest.raises(FpetError, match="no schedule reaches this budget"):
        shortlist(rows, Budget(min_speedup=50), 8)
    with pytest.raises(FpetError, match="give one budget"):
        Budget()


def test_the_second_round_looks_between_the_best_hit_and_the_closest_miss():
    pool = [{"schedule": f"s{g}", "gmacs": g} for g in (0.6, 0.7, 0.75, 0.8, 0.85, 0.9)]
    timed = [{"schedule": "s0.6", "gmacs": 0.6, "speedup": 2.0}, {"schedule": "s0.9", "gmacs": 0.9, "speedup": 1.4}]
    band = between(pool, timed, Budget(min_speedup=1.5), 4)
    assert [r["schedule"] for r in band] == ["s0.85", "s0.8", "s0.75", "s0.7"]


def test_search_writes_the_table_the_plot_and_a_choice_that_meets_the_budget(tmp_path):
    out = tmp_path / "search"
    result = run_fpet(
        "schedule",
        "search",
        "--backbone",
        "vit_tiny_patch16_224",
        "--img-size",
        "64",
        "--min-speedup",
        "1.2",
        "--no-train",
        "--candidates",
        "4",
        "--repeats",
        "1",
        "--threads",
        "1",
        "--out",
        str(out),
        home=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    saved = json.loads((out / "schedules.json").read_text())
    assert saved["chosen"]["speedup"] >= 1.2 and saved["chosen"] in saved["rows"]
    assert all("accuracy" not in row for row in saved["rows"])
    assert f"`{saved['chosen']['schedule']}`" in (out / "schedules.md").read_text()
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_search_with_data_trains_the_most_promising_and_chooses_by_accuracy(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=8, size=64)
    out = tmp_path / "search"
    result = run_fpet(
        "schedule",
        "search",
        "--backbone",
        "vit_tiny_patch16_224",
        "--img-size",
        "64",
        "--max-gmacs",
        "0.08",
        "--data",
        str(data),
        "--weights",
        "random",
        "--epochs",
        "1",
        "--train-top",
        "2",
        "--train-size",
        "16",
        "--val-size",
        "8",
        "--candidates",
        "4",
        "--repeats",
        "1",
        "--threads",
        "1",
        "--out",
        str(out),
        home=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    saved = json.loads((out / "schedules.json").read_text())
    trained = [row for row in saved["rows"] if "accuracy" in row]
    assert len(trained) == 2 and saved["chosen"] in trained
    assert saved["chosen"]["accuracy"] == max(row["accuracy"] for row in trained)
    assert len(list((out / "runs").iterdir())) == 2
