"""Paired tests on shared images: McNemar's exact test and the paired bootstrap, and `fpet compare`."""

import json

import pytest

from tests.helpers.servers import run_fpet
from tests.helpers.tiny import make_image_folder, tiny_config
from training.loop import train
from training.paired import mcnemar, paired_bootstrap


def test_mcnemar_counts_only_the_discordant_images():
    a = [True] * 90 + [True] * 8 + [False] * 2
    b = [True] * 90 + [False] * 8 + [True] * 2
    result = mcnemar(a, b)
    assert (result["only_a_right"], result["only_b_right"]) == (8, 2)
    assert result["p_value"] == pytest.approx(0.109375)  # 2 * P(X <= 2), X ~ Binomial(10, 0.5)
    assert mcnemar([True, False], [True, False])["p_value"] == 1.0  # no discordant image: no evidence


def test_the_paired_bootstrap_interval_holds_the_difference_and_pools_seeds():
    a = [True] * 60 + [False] * 40
    b = [True] * 50 + [False] * 50
    one = paired_bootstrap([(a, b)], draws=2000)
    assert one["difference_points"] == pytest.approx(10.0)
    low, high = one["ci95_points"]
    assert 0 < low < 10 < high and one["share_not_better"] < 0.05
    same = paired_bootstrap([(a, a), (b, b)], draws=500)
    assert same["difference_points"] == 0 and same["ci95_points"] == [0.0, 0.0] and same["runs"] == 2


def test_compare_two_runs_on_the_same_images(tmp_path):
    data = make_image_folder(tmp_path / "data" / "train", per_class=12)
    make_image_folder(tmp_path / "data" / "test", per_class=4, seed=1)
    for name, schedule in (("a", "6:0.5"), ("b", "none")):
        train(
            tiny_config(tmp_path / "data", tmp_path / name, schedule=schedule, epochs=1, test=False), log=lambda _: None
        )
    assert data.is_dir()
    out = tmp_path / "compare.json"
    result = run_fpet(
        "compare",
        "--a",
        str(tmp_path / "a"),
        "--b",
        str(tmp_path / "b"),
        "--data",
        str(tmp_path / "data"),
        "--out",
        str(out),
        home=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    saved = json.loads(out.read_text())
    assert saved["bootstrap"]["images"] == 12 and len(saved["mcnemar"]) == 1
    assert saved["bootstrap"]["difference_points"] == pytest.approx(
        100 * (saved["accuracy_a"][0] - saved["accuracy_b"][0])
    )
    bad = run_fpet(
        "compare",
        "--a",
        str(tmp_path / "a"),
        "--b",
        str(tmp_path / "b"),
        str(tmp_path / "a"),
        "--data",
        str(tmp_path / "data"),
        home=tmp_path,
    )
    assert bad.returncode != 0 and "as many runs" in bad.stderr


def test_training_stores_per_image_test_results_that_compare_reuses(tmp_path):
    make_image_folder(tmp_path / "data" / "train", per_class=12)
    make_image_folder(tmp_path / "data" / "test", per_class=4, seed=1)
    for name, schedule in (("a", "6:0.5"), ("b", "none")):
        train(
            tiny_config(tmp_path / "data", tmp_path / name, schedule=schedule, epochs=1, test=True), log=lambda _: None
        )
    stored = json.loads((tmp_path / "a" / "test_correct.json").read_text())
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert stored["n"] == 12 and stored["correct"].count("1") / 12 == pytest.approx(metrics["test"]["last"]["accuracy"])
    args = ("compare", "--a", str(tmp_path / "a"), "--b", str(tmp_path / "b"), "--data", str(tmp_path / "data"))
    reused = run_fpet(*args, home=tmp_path)
    assert reused.returncode == 0 and reused.stderr.count("stored by training") == 2, reused.stderr
    recomputed = run_fpet(*args, "--recompute", home=tmp_path)
    assert recomputed.returncode == 0 and "stored by training" not in recomputed.stderr
    assert json.loads(reused.stdout) == json.loads(recomputed.stdout)
    other = run_fpet(
        "compare",
        "--a",
        str(tmp_path / "a"),
        "--b",
        str(tmp_path / "b"),
        "--data",
        str(tmp_path / "data" / "."),
        "--split",
        "val",
        home=tmp_path,
    )
    assert "stored by training" not in other.stderr
