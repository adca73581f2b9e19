"""The committed default model: it reloads on the real DINOv2 weights and exports into verified bundles."""

import json
from pathlib import Path

import pytest

from export.defaults import DEFAULT_RUN, ensure_default_bundles

pytestmark = pytest.mark.network


def test_default_model_is_committed_with_its_metrics():
    config = json.loads((DEFAULT_RUN / "config.json").read_text())
    metrics = json.loads((DEFAULT_RUN / "metrics.json").read_text())
    assert config["backbone"]["weights"] == "dinov2_vits14" and config["schedule"] == "6:0.5"
    assert metrics["test"]["last"]["n"] == 10000
    assert (DEFAULT_RUN / "adapters.safetensors").stat().st_size < 1_000_000


def test_default_bundles_build_from_the_committed_model(fetched, monkeypatch):
    home, _ = fetched
    monkeypatch.setenv("FPET_HOME", str(home))
    bundles = ensure_default_bundles(log=lambda _: None)
    for variant, path in bundles.items():
        manifest = json.loads((Path(path) / "manifest.json").read_text())
        assert manifest["variant"] == variant
        assert all(result["passed"] for result in manifest["verification"]["formats"].values())
        record = json.loads((home / "dinov2_vits14.json").read_text())
        assert manifest["backbone"]["tensors_sha256"] == record["tensors_sha256"]
