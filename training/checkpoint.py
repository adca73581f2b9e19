"""Run folders: `adapters.safetensors` (trainable tensors only), `config.json`, `metrics.json`, and `resume.pt`.

Every file is written atomically. Loading checks the format version and the backbone weights' checksum, so a run
is never silently combined with different backbone weights.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fpet.atomic import write_atomic, write_json_atomic
from fpet.config import ViTConfig
from fpet.errors import FpetError
from fpet.pet import PetConfig, load_trainable_state_dict, trainable_state_dict
from fpet.pretrained import REGISTRY, cached, weights_path
from fpet.vit import VisionTransformer
from fpet.weights import load_backbone, load_timm_weights, read_state_dict, tensors_sha256

FORMAT_VERSION = 1
ADAPTERS, CONFIG, METRICS, LABELS, RESUME, TEST_CORRECT = (
    "adapters.safetensors",
    "config.json",
    "metrics.json",
    "labels.json",
    "resume.pt",
    "test_correct.json",
)


def resolve_weights(weights: str) -> Path | str | None:
    """A registry name (from the cache), a file path, `timm:NAME` (needs the timm extra), or `random` (None)."""
    if weights == "random":
        return None
    if weights.startswith("timm:"):
        return weights
    if weights in REGISTRY:
        if cached(weights) is None:
            raise FpetError(f"pretrained weights {weights!r} are not fetched yet: run `fpet weights fetch {weights}`")
        return weights_path(weights)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FpetError(f"weights {weights!r} are neither a known name ({', '.join(REGISTRY)}), a file, nor 'random'")
    return path


def read_weights(source: Path | str | None) -> tuple[dict | None, str | None]:
    """The backbone tensors and their content digest (None, None for random weights)."""
    if source is None:
        return None, None
    tensors = load_timm_weights(source.removeprefix("timm:")) if isinstance(source, str) else read_state_dict(source)
    return tensors, tensors_sha256(tensors)


def software_versions() -> dict:
    import numpy

    import fpet

    return {
        "fpet": getattr(fpet, "__version__", "unknown"),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def build_model(config: dict, drop_path_rate: float = 0.0) -> VisionTransformer:
    """The run's model, initialised from the run's seed: with `--weights random` that init is the backbone."""
    cfg = ViTConfig(**config["backbone"]["arch"])
    pet = PetConfig(**config["pet"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config["seed"])
        return VisionTransformer(
            cfg, len(config["labels"]), config["preprocessing"]["img_size"], pet, config["schedule"], drop_path_rate
        )


def write_run(run_dir: Path, model: VisionTransformer, config: dict, metrics: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in trainable_state_dict(_unwrap(model)).items()}
    write_atomic(run_dir / ADAPTERS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": str(FORMAT_VERSION)}))
    write_json_atomic(run_dir / CONFIG, config)
    write_json_atomic(run_dir / METRICS, metrics)
    write_json_atomic(run_dir / LABELS, config["labels"])


def write_test_correct(run_dir: Path, data: str, correct: list[bool]) -> None:
    """Keep which test images the final model got right, so paired tests between runs need no re-evaluation."""
    bits = "".join("1" if c else "0" for c in correct)
    write_json_atomic(run_dir / TEST_CORRECT, {"data": str(Path(data).resolve()), "n": len(bits), "correct": bits})


def read_test_correct(run_dir: str | Path, data: str) -> list[bool] | None:
    """The stored per-image results on `data`'s test split, or None when the run has none for that data."""
    path = Path(run_dir) / TEST_CORRECT
    if not path.is_file():
        return None
    stored = json.loads(path.read_text())
    bits = stored.get("correct")
    if stored.get("data") != str(Path(data).resolve()) or not isinstance(bits, str) or len(bits) != stored.get("n"):
        return None
    if set(bits) - {"0", "1"}:
        raise FpetError(f"{path} is damaged: 'correct' must hold only 0 and 1; delete it to re-evaluate the run")
    return [b == "1" for b in bits]


def read_config(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    missing = [name for name in (ADAPTERS, CONFIG) if not (run_dir / name).is_file()]
    if missing:
        raise FpetError(f"{run_dir} is not a complete run folder: missing {', '.join(missing)}")
    try:
        config = json.loads((run_dir / CONFIG).read_text())
    except ValueError as exc:
        raise FpetError(f"{run_dir / CONFIG} is damaged (not JSON: {exc})") from None
    version = config.get("format_version") if isinstance(config, dict) else None
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise FpetError(
            f"{run_dir} has run format {version!r}; this fpet reads up to {FORMAT_VERSION}: upgrade fpet to load it"
        )
    return config


def load_run(
    run_dir: str | Path, weights: str | None = None, schedule: str | None = None
) -> tuple[VisionTransformer, dict]:
    """Rebuild a trained model: backbone weights (checksum checked), then the run's trained tensors.

    `schedule` overrides the run's merge schedule (e.g. `none` for the same tuned model without merging); the
    refinement adapters of merge points it drops are left out.
    """
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    if schedule is not None:
        config = {**config, "schedule": schedule}
    backbone = config["backbone"]
    path = resolve_weights(weights or backbone["weights"])
    tensors, digest = read_weights(path)
    if digest != backbone["tensors_sha256"]:
        raise FpetError(
            f"backbone weights {path} have tensors sha256 {str(digest)[:16]}..., but {run_dir} was trained on "
            f"{str(backbone['tensors_sha256'])[:16]}...: refusing to combine them"
        )
    model = build_model(config)
    if tensors is not None:
        load_backbone(model, tensors)
    tensors = read_adapters(run_dir)
    if schedule is not None:
        wanted = {name for name, p in model.named_parameters() if p.requires_grad}
        tensors = {k: v for k, v in tensors.items() if k in wanted or ".merger." not in k}
    load_trainable_state_dict(model, tensors)
    return model.eval(), config


def read_adapters(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """A run's trained tensors (safetensors: nothing in the file can run code)."""
    path = Path(run_dir) / ADAPTERS
    try:
        return load_file(str(path))
    except SafetensorError as exc:
        raise FpetError(f"{path} is damaged (not readable safetensors: {exc})") from None


def save_resume(run_dir: Path, state: dict) -> None:
    write_atomic(run_dir / RESUME, lambda tmp: torch.save(state, tmp))


def load_resume(run_dir: Path) -> dict:
    path = run_dir / RESUME
    if not path.is_file():
        raise FpetError(f"nothing to resume: {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: torch's errors run to many lines
        raise FpetError(f"{path} is damaged and cannot be resumed from: {exc}".splitlines()[0]) from None


def _unwrap(model: torch.nn.Module) -> VisionTransformer:
    return getattr(model, "module", model)
