"""Loading pretrained backbone weights from files (safetensors, Google .npz, .pth) or timm, into timm's layout.

Nothing here unpickles arbitrary objects: .pth files load with `weights_only=True`, .npz with pickles refused.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fpet.errors import FpetError
from fpet.vit import VisionTransformer, resample_pos_embed


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tensors_sha256(tensors: dict[str, Tensor]) -> str:
    """A digest of the weights themselves (names, dtypes, shapes, bytes), whatever file format holds them.

    File checksums are not stable: safetensors writes its metadata map in a different order on every save.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as exc:
        raise FpetError(f"{path} is not a readable safetensors file (damaged or truncated?): {exc}") from None


def _load_pth(path: Path) -> dict[str, Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError and friends with long messages
        raise FpetError(
            f"{path} is not a plain tensor checkpoint (refusing to unpickle it): {exc}".splitlines()[0]
        ) from None
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise FpetError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _load_npz(path: Path) -> dict[str, Tensor]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except ValueError as exc:
        raise FpetError(f"{path} is not a plain .npz of arrays: {exc}") from None
    try:
        return convert_google_npz(arrays)
    except KeyError as exc:
        raise FpetError(f"{path} is not a complete Google ViT checkpoint: it lacks {exc}") from None


def _t(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).float()


def convert_google_npz(arrays: dict[str, np.ndarray]) -> dict[str, Tensor]:
    """Google's ViT checkpoints (big_vision / vision_transformer .npz) to timm's state-dict layout."""
    arrays = {k.removeprefix("opt/target/"): v for k, v in arrays.items()}
    if "embedding/kernel" not in arrays:
        raise FpetError("the .npz file is not a Google ViT checkpoint (no 'embedding/kernel')")
    sd: dict[str, Tensor] = {
        "patch_embed.proj.weight": _t(arrays["embedding/kernel"].transpose(3, 2, 0, 1)),
        "patch_embed.proj.bias": _t(arrays["embedding/bias"]),
        "cls_token": _t(arrays["cls"]),
        "pos_embed": _t(arrays["Transformer/posembed_input/pos_embedding"]),
        "norm.weight": _t(arrays["Transformer/encoder_norm/scale"]),
        "norm.bias": _t(arrays["Transformer/encoder_norm/bias"]),
    }
    if "head/kernel" in arrays:
        sd["head.weight"] = _t(arrays["head/kernel"].T)
        sd["head.bias"] = _t(arrays["head/bias"])
    blocks = sorted({int(m.group(1)) for k in arrays if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))})
    for i in blocks:
        src, dst = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        att = src + "MultiHeadDotProductAttention_1/"
        dim = arrays[att + "query/kernel"].shape[0]
        sd[dst + "attn.qkv.weight"] = torch.cat(
            [_t(arrays[att + f"{n}/kernel"].reshape(dim, -1).T) for n in ("query", "key", "value")]
        )
        sd[dst + "attn.qkv.bias"] = torch.cat(
            [_t(arrays[att + f"{n}/bias"].reshape(-1)) for n in ("query", "key", "value")]
        )
        sd[dst + "attn.proj.weight"] = _t(arrays[att + "out/kernel"].reshape(-1, dim).T)
        sd[dst + "attn.proj.bias"] = _t(arrays[att + "out/bias"])
        for j, name in ((0, "norm1"), (2, "norm2")):
            sd[dst + f"{name}.weight"] = _t(arrays[src + f"LayerNorm_{j}/scale"])
            sd[dst + f"{name}.bias"] = _t(arrays[src + f"LayerNorm_{j}/bias"])
        for j in (0, 1):
            sd[dst + f"mlp.fc{j + 1}.weight"] = _t(arrays[src + f"MlpBlock_3/Dense_{j}/kernel"].T)
            sd[dst + f"mlp.fc{j + 1}.bias"] = _t(arrays[src + f"MlpBlock_3/Dense_{j}/bias"])
    return sd


LOADERS: dict[str, Callable[[Path], dict[str, Tensor]]] = {
    ".safetensors": _load_safetensors,
    ".npz": _load_npz,
    ".pth": _load_pth,
    ".pt": _load_pth,
    ".bin": _load_pth,
}


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FpetError(f"weights file {path} does not exist")
    loader = LOADERS.get(path.suffix.lower())
    if loader is None:
        raise FpetError(f"cannot read weights from {path.name}: expected one of {', '.join(LOADERS)}")
    return loader(path)


def adapt_state_dict(sd: dict[str, Tensor], model: VisionTransformer) -> dict[str, Tensor]:
    """Fit foreign weights to the model: resample the position grid, drop a head of another task."""
    sd = dict(sd)
    pos = sd.get("pos_embed")
    if pos is not None and pos.shape != model.pos_embed.shape:
        old = round((pos.shape[1] - 1) ** 0.5)
        if old * old != pos.shape[1] - 1:
            raise FpetError(
                f"cannot resample a position embedding of {pos.shape[1]} tokens (expected cls + a square grid)"
            )
        sd["pos_embed"] = resample_pos_embed(pos, (old, old), model.grid)
    own = model.state_dict()
    for key in ("head.weight", "head.bias"):
        if key in sd and (key not in own or sd[key].shape != own[key].shape):
            del sd[key]
    return sd


def load_backbone(model: VisionTransformer, sd: dict[str, Tensor]) -> list[str]:
    """Load backbone weights; returns the keys left at their initial values (PET modules, merges, head).

    A backbone tensor missing from `sd`, or a tensor the model does not have, is an error: silently random
    backbone weights are the classic way to get plausible-looking garbage.
    """
    sd = adapt_state_dict(sd, model)
    own = model.state_dict()
    unexpected = sorted(set(sd) - set(own))
    missing = sorted(set(own) - set(sd))
    backbone_missing = [k for k in missing if not _is_added(k)]
    if unexpected or backbone_missing:
        raise FpetError(
            f"weights do not fit {model.cfg.name}: missing {backbone_missing[:4]}, unexpected {unexpected[:4]}"
        )
    for key, value in sd.items():
        if value.shape != own[key].shape:
            raise FpetError(f"weights tensor {key} has shape {tuple(value.shape)}, the model {tuple(own[key].shape)}")
    model.load_state_dict(sd, strict=False)
    return missing


def _is_added(key: str) -> bool:
    parts = key.split(".")
    return parts[0] == "head" or any(p in ("adapter", "lora", "merger") for p in parts)


def load_timm_weights(name: str) -> dict[str, Tensor]:
    """Weights by timm model name; needs the `timm` extra and network access (or timm's local cache)."""
    try:
        import timm
    except ImportError:
        raise FpetError(f"loading {name!r} by name needs timm: pip install 'fpet[timm]'") from None
    try:
        return timm.create_model(name, pretrained=True).state_dict()
    except Exception as exc:
        raise FpetError(f"timm could not load pretrained {name!r} (no network?): {exc}".splitlines()[0]) from None
