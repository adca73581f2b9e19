"""Where fpet keeps things: `$FPET_HOME` (default `~/.cache/fpet`). No torch import: the service reads it too."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_RUN_NAME = "fashion_mnist_fpet_adaptformer"


def fpet_home() -> Path:
    return Path(os.environ.get("FPET_HOME") or "~/.cache/fpet").expanduser()


def default_bundle_dir(variant: str, run_name: str = DEFAULT_RUN_NAME) -> Path:
    """Where `fpet export --default` puts the default model's bundle of a variant, and `fpet serve` looks."""
    return fpet_home() / "bundles" / run_name / variant
