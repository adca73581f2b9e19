"""The default bundles: the committed default model, exported into the cache when missing or stale."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from export.bundle import BUNDLE_FORMAT, VARIANTS, is_bundle, read_manifest
from export.exporter import ExportOptions, export_bundle, run_checksum
from fpet.errors import FpetError
from fpet.paths import DEFAULT_RUN_NAME, default_bundle_dir

DEFAULT_RUN = Path(__file__).resolve().parents[1] / "models" / DEFAULT_RUN_NAME


def default_run() -> Path:
    run = Path(os.environ.get("FPET_DEFAULT_RUN") or DEFAULT_RUN)
    if not run.is_dir():
        raise FpetError(f"the default model {run} is missing (set FPET_DEFAULT_RUN to a run folder)")
    return run


def is_fresh(bundle: Path, checksum: str) -> bool:
    if not is_bundle(bundle):
        return False
    try:
        manifest = read_manifest(bundle)
        return manifest["source_run"]["sha256"] == checksum and manifest["bundle_format"] == BUNDLE_FORMAT
    except (FpetError, KeyError, ValueError):
        return False


def ensure_default_bundles(force: bool = False, log: Callable[[str], None] = print) -> dict[str, Path]:
    """Both variants of the default model, rebuilt only when the run changed (checksums), when this fpet writes a
    newer bundle format, or when forced."""
    run = default_run()
    checksum = run_checksum(run)
    bundles = {}
    for variant in VARIANTS:
        out = default_bundle_dir(variant, run.name)
        if force or not is_fresh(out, checksum):
            export_bundle(run, out, ExportOptions(variant=variant), log=log)
        else:
            log(f"{variant} bundle is up to date: {out}")
        bundles[variant] = out
    return bundles
