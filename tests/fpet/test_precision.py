"""Merging must not depend on the surrounding precision: fp16 graphs and bf16 autocast match on fp32 scores."""

import pytest
import torch

from fpet import merge
from fpet.schedule import MergeStep
from fpet.trr import TokenMerger

GRID = 14


def tie_grid() -> tuple[torch.Tensor, torch.Tensor]:
    """Keys of a flat background (one direction plus small noise) around a distinct object, exactly representable
    in fp16 so that every precision starts from the same numbers. Cosines between background tokens differ by less
    than fp16's resolution near 1, so low-precision scores tie and argmax piles them all into one column."""
    g = torch.Generator().manual_seed(0)
    background, thing = torch.randn(64, generator=g), torch.randn(64, generator=g)
    keys = background + 0.01 * torch.randn(1, 1 + GRID * GRID, 64, generator=g)
    cells = keys[:, 1:].view(1, GRID, GRID, 64)
    cells[:, 5:9, 5:9] = thing + 0.3 * torch.randn(1, 4, 4, 64, generator=g)
    x = torch.randn(1, 1 + GRID * GRID, 32, generator=g)
    return keys.half().float(), x.half().float()


STEP = MergeStep(block=0, method="tome", tokens_in=1 + GRID * GRID, n_a=98, n_b=99, merged=98, grid=(GRID, GRID))


def merged_sizes(keys: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    merger = TokenMerger("tome", head_dim=keys.shape[-1])
    size = torch.ones_like(x[..., :1], dtype=torch.float32)  # sizes are fp32 in every precision
    with torch.no_grad():
        out, size, _ = merger(x, size, keys, STEP)
    assert torch.isfinite(out).all()
    return size.float()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_tensors_merge_as_fp32_does(dtype):
    keys, x = (t.to(dtype) for t in tie_grid())
    reference = merged_sizes(keys.float(), x.float())
    assert reference.max() <= 20, "the grid must not pile up in fp32 either, or it tests nothing"
    low = merged_sizes(keys, x)
    assert torch.equal(low, reference), f"largest merged token: {low.max():.0f} patches vs {reference.max():.0f}"


def test_bf16_autocast_merges_as_fp32_does():
    keys, x = tie_grid()
    reference = merged_sizes(keys, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = merged_sizes(keys, x)
    assert torch.equal(low, reference), f"largest merged token: {low.max():.0f} patches vs {reference.max():.0f}"


def test_merge_does_not_overflow_in_fp16():
    """Sizes in the hundreds times activations in the hundreds overflow fp16 (max 65504) if multiplied first."""
    x = torch.full((1, 6, 8), 300.0, dtype=torch.float16)
    size = torch.full((1, 6, 1), 250.0)
    a, b = merge.alternate_split(6)
    scores = torch.tensor([[[float("-inf"), 1.0, 0.0]] * 3])  # every A token joins B's second token
    merged, new_size, _ = merge.merge_tokens(x, size, scores, a, b, k=3, learned=False)
    assert torch.isfinite(merged).all() and merged.dtype == torch.float16
    assert torch.allclose(merged.float(), torch.full((1, 3, 8), 300.0))
    assert new_size.flatten().tolist() == [250.0, 1000.0, 250.0]


def test_split_indices_built_under_inference_mode_work_in_training():
    """Index tensors cached from an inference_mode call must not poison a later autograd step."""
    with torch.inference_mode():
        a, b = merge.checkerboard_split(7, 9)
    metric = torch.randn(2, 64, 8, requires_grad=True)
    a, b = merge.checkerboard_split(7, 9)
    x = torch.randn(2, 64, 16, requires_grad=True)
    scores = merge.similarity(metric, a, b)
    out, _, _ = merge.merge_tokens(x, torch.ones(2, 64, 1), scores, a, b, 10, learned=True)
    out.sum().backward()
    assert x.grad is not None


def test_openvino_bf16_keeps_the_matching_in_fp32_and_everything_the_tokens_pass_through_in_bf16(tiny_bundles):
    """The graph's precision boundary, as OpenVINO compiles an fp32 bundle for bf16 on a CPU matrix engine: from each
    argmax back to the linear layers that feed it (normalised keys, scores) everything runs fp32, while every
    LayerNorm, residual add, linear layer, attention and the merge's own product runs bf16, after the merge too.
    A CPU without a bf16 engine cannot show that (OpenVINO silently computes fp32 there): on one, what is checked is
    that the runtime refuses bf16 instead of reporting a precision it does not compute."""
    import re

    from fpet.errors import FpetError
    from fpet.runtimes import OpenVinoSession, choose, cpu_features, supports

    if not supports("bf16", cpu_features()):
        with pytest.raises(FpetError, match="bf16 needs a CPU with AMX-BF16 or AVX512-BF16"):
            choose("openvino", "bf16", features=cpu_features())
        return
    session = OpenVinoSession(tiny_bundles["fpet"] / "model.onnx", "bf16")
    ops = session.compiled.get_runtime_model().get_ordered_ops()

    def kind(op) -> str:
        return op.get_rt_info()["layerType"].astype(str)

    def precision(op) -> str:
        return op.get_rt_info()["runtimePrecision"].astype(str)

    residual = re.compile(r"/blocks\.\d+/Add(_\d+)?")
    tokens = [
        op
        for op in ops
        if kind(op) in ("MVN", "FullyConnected", "Subgraph", "MatMul") or residual.fullmatch(op.get_friendly_name())
    ]
    assert sum(kind(op) == "MVN" for op in tokens) == 2 * 12 + 1 and any(kind(op) == "MatMul" for op in tokens)
    widened = [f"{kind(op)} {op.get_friendly_name()}" for op in tokens if precision(op) != "bf16"]
    assert not widened, f"fp32 on the token path: {widened}"

    matching, todo = {}, [op for op in ops if kind(op) == "TopK"]
    assert todo, "no argmax in the compiled graph"
    while todo:
        op = todo.pop()
        for source in op.inputs():
            parent = source.get_source_output().get_node()
            if kind(parent) not in ("FullyConnected", "Const", "Input") and parent.get_friendly_name() not in matching:
                matching[parent.get_friendly_name()] = parent
                todo.append(parent)
    computed = [op for op in matching.values() if kind(op) in ("Eltwise", "Reduce", "MatMul", "Subgraph")]
    assert len(computed) >= 4, "the keys' refinement, their norm, the scores' product and sum"
    lowered = [f"{kind(op)} {op.get_friendly_name()} ({precision(op)})" for op in computed if precision(op) != "f32"]
    assert not lowered, f"the matching is not fp32: {lowered}"
