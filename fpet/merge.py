"""Token merging maths as pure tensor functions: splits, matching and the size-weighted merge.

Shapes: x [B, N, C] with cls at index 0, size [B, N, 1] (how many original patches each token stands for, always
fp32; None before the first merge), metric [B, N, c]. Index tensors are static (they depend only on shapes), so
exported graphs keep static shapes and use no scatter ops: the sources go into B through a dense product of their
size-weighted one-hot assignment, which exports exactly (see docs on export pitfalls).

The precision boundary: the matching (normalised keys, scores, argmax) and the sizes run in fp32 whatever the
surrounding precision (fp16 graphs, bf16 or fp16 autocast, a runtime's own bf16): cosine scores of near-identical
tokens differ by less than half precision resolves near 1, and tied rows all go to the first column, piling a flat
background into one token. Everything the tokens pass through stays in the tokens' precision: the fp32 side meets
them only as the merge weights, cast once, and as the attention's size bias, computed once per merge point.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


@functools.lru_cache(maxsize=64)
def _checkerboard_lists(h: int, w: int) -> tuple[list[int], list[int]]:
    cells = [(1 + r * w + c, (r + c) % 2 == 0) for r in range(h) for c in range(w)]
    return [i for i, even in cells if even], [0] + [i for i, even in cells if not even]


def checkerboard_split(h: int, w: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Sequence indices of set A (patch cells with row + col even) and set B (cls, then the other cells).

    Built per call from cached Python lists: a cached tensor made under `inference_mode` would be an inference
    tensor and break a later training step; traced graphs hold these as constants either way.
    """
    a, b = _checkerboard_lists(h, w)
    return torch.tensor(a, device=device), torch.tensor(b, device=device)


def alternate_split(n: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """A = patch tokens at odd sequence positions, B = cls and the even positions (used once the grid is gone)."""
    return torch.arange(1, n, 2, device=device), torch.arange(0, n, 2, device=device)


def full_precision(device: torch.device) -> torch.autocast:
    """A region where autocast is off, so the explicit fp32 casts inside it hold."""
    return torch.autocast(device_type=device.type, enabled=False)


def similarity(metric: Tensor, a_idx: Tensor, b_idx: Tensor) -> Tensor:
    """Cosine similarity A x B in fp32; the cls column (B's first) is -inf so nothing merges into cls.

    Exported as a broadcast product and a sum, not a matrix product: runtimes that lower a graph's precision
    themselves (OpenVINO's bf16 on CPU matrix engines) lower every matrix product, but keep the layers between a
    graph output and the nearest matrix product in fp32 (here the argmax feeds the merge maps). Eager PyTorch takes
    the matrix product: the same numbers without the [B, |A|, |B|, head_dim] temporary, which training at high
    resolution could not afford."""
    with full_precision(metric.device):
        metric = metric.float()
        metric = metric / torch.linalg.vector_norm(metric, dim=-1, keepdim=True).clamp_min(1e-6)
        a, b = metric.index_select(1, a_idx), metric.index_select(1, b_idx)
        if torch.onnx.is_in_onnx_export():
            scores = (a.unsqueeze(2) * b.unsqueeze(1)).sum(dim=-1)
        else:
            scores = a @ b.transpose(-1, -2)
        return scores + torch.tensor([float("-inf")] + [0.0] * (b_idx.numel() - 1), device=metric.device)


def one_hot(indices: Tensor, n: int) -> Tensor:
    """fp32 one-hot rows of integer indices, by comparison (exports as Equal and Cast, no OneHot op)."""
    return (indices.unsqueeze(-1) == torch.arange(n, device=indices.device)).float()


def hard_assignment(scores: Tensor) -> Tensor:
    """One-hot of each row's argmax. argmax breaks exact ties (first index) where `soft > 0.5` would drop the row."""
    return one_hot(scores.argmax(dim=-1), scores.shape[-1])


def fpet_assignment(scores: Tensor) -> Tensor:
    """FPET's straight-through assignment: the forward pass is the hard one-hot, the backward pass is sigmoid's.

    soft = sigmoid(S - m) with m the mean of each row's top-2 scores, so only the best match sits above 0.5.
    """
    m = scores.topk(2, dim=-1).values.mean(dim=-1, keepdim=True)
    soft = torch.sigmoid(scores - m)
    return soft + (hard_assignment(scores) - soft).detach()


@functools.lru_cache(maxsize=64)
def _layout(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[list[bool], list[int], list[int]]:
    """Per sequence position: whether it is in B, its index in B, and its index in A (0 in B)."""
    in_b, b_pos, a_pos = [False] * (len(a) + len(b)), [0] * (len(a) + len(b)), [0] * (len(a) + len(b))
    for i, position in enumerate(b):
        in_b[position], b_pos[position] = True, i
    for i, position in enumerate(a):
        a_pos[position] = i
    return in_b, b_pos, a_pos


def match_order(scores: Tensor) -> Tensor:
    """The A tokens, strongest best match first (ToMe's order: the first k merge)."""
    return scores.max(dim=-1).values.argsort(dim=-1, descending=True)


def destinations(scores: Tensor, a_idx: Tensor, b_idx: Tensor, k: int, order: Tensor | None = None) -> Tensor:
    """[B, N] int64, per input token the output token it joins. Output order: the B tokens (cls first), then the A
    tokens kept, best matched first; the k A tokens with the strongest best match (all of A for k = |A|, as in
    FPET; ToMe's r otherwise) join their best B token, the others are kept. `order`: `match_order(scores)`."""
    n_a, n_b = a_idx.numel(), b_idx.numel()
    row = scores.argmax(dim=-1)  # [B, |A|]: each A token's best B token
    if k < n_a:
        rank = (match_order(scores) if order is None else order).argsort(dim=-1)
        row = torch.where(rank < k, row, n_b + rank - k)
    in_b, b_pos, a_pos = _layout(tuple(a_idx.tolist()), tuple(b_idx.tolist()))
    device = scores.device
    return torch.where(
        torch.tensor(in_b, device=device),
        torch.tensor(b_pos, device=device),
        row.index_select(1, torch.tensor(a_pos, device=device)),
    )


def gather_rows(t: Tensor, rows: Tensor) -> Tensor:
    """t[b, rows[b]] for every batch element, as a gather with static shapes."""
    return t.gather(1, rows.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


def merge_tokens(
    x: Tensor,
    size: Tensor | None,
    scores: Tensor,
    a_idx: Tensor,
    b_idx: Tensor,
    k: int,
    learned: bool,
    groups: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Merge k of the A tokens into B by size-weighted mean. Output: the B tokens (cls first), then the A tokens kept;
    returns the tokens, their sizes and `groups`.

    `size` None: every token stands for one patch (before the first merge). `learned` selects FPET's
    straight-through assignment (for training); otherwise the hard one-hot (ToMe, and FPET at deployment, where both
    agree in the forward pass). The weights (each at most 1, summing to 1 per destination, so that the products stay
    in the tokens' range in fp16) and the sizes are fp32 elementwise work, cast once to the tokens' precision: what
    the tokens pass through is gathers, one elementwise scale and add, and one matrix product, all in their own
    precision. The sums over sources are elementwise too, not products with the one-hot, which would leave fp32.

    `groups` ([B, patches], int64: the token each original patch is in) follows each input token to its output
    token by gathers. As a graph output (the merge maps) it ties the matching to the graph's tail with no matrix
    product between them, and runtimes keep a graph's tail in fp32 when they lower the rest (OpenVINO's CPU plugin
    does for bf16 and fp16): that is what holds the matching in fp32 in an fp32 graph compiled for bf16.
    """
    n_a = a_idx.numel()
    order = match_order(scores) if k < n_a else None
    with full_precision(x.device):
        assign = fpet_assignment(scores) if learned else hard_assignment(scores)  # [B, |A|, |B|]
        s_a = s_b = None
        if size is not None:
            s_a, s_b = size.float().index_select(1, a_idx), size.float().index_select(1, b_idx)
        if order is not None:
            assign = gather_rows(assign, order[:, :k])
        into_b = assign.transpose(-1, -2)  # [B, |B|, sources]
        if s_a is not None:
            into_b = into_b * (s_a if order is None else gather_rows(s_a, order[:, :k])).transpose(-1, -2)
        received = into_b.sum(dim=-1, keepdim=True)
        new_b = received + 1 if s_b is None else received + s_b
        weights, keep = into_b / new_b, (1 if s_b is None else s_b) / new_b
    x_a, x_b = x.index_select(1, a_idx), x.index_select(1, b_idx)
    sources = x_a if order is None else gather_rows(x_a, order[:, :k])
    merged, new_size = x_b * keep.to(x.dtype) + weights.to(x.dtype) @ sources, new_b
    if order is not None:
        kept = order[:, k:]
        s_kept = torch.ones_like(new_b[:, :1]).expand(-1, n_a - k, -1) if s_a is None else gather_rows(s_a, kept)
        merged, new_size = torch.cat([merged, gather_rows(x_a, kept)], 1), torch.cat([new_b, s_kept], 1)
    if groups is not None:
        groups = destinations(scores, a_idx, b_idx, k, order).gather(1, groups)
    return merged, new_size, groups


def initial_groups(batch: int, patches: int, device: torch.device) -> Tensor:
    """[B, patches]: before any merge each patch is its own token, after cls."""
    return torch.arange(1, patches + 1, device=device).expand(batch, -1)


def size_bias(size: Tensor, dtype: torch.dtype) -> Tensor:
    """Proportional attention: log(size) of each key, shaped to add to [B, heads, N, N] logits of `dtype`.
    Computed once per merge point (in fp32, then cast) and shared by the blocks that follow it."""
    return size.log().transpose(-1, -2).unsqueeze(1).to(dtype)
