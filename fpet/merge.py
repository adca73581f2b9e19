"""Token merging maths as pure tensor functions: splits, matching and the size-weighted merge.

Shapes: x [B, N, C] with cls at index 0, size [B, N, 1] (how many original patches each token stands for, always
fp32; None before the first merge), metric [B, N, c]. Index tensors are static (they depend only on shapes), so
exported graphs keep static shapes and use no scatter ops: the merge is one dense matrix product of 0/1 rows
weighted by size, which exports exactly (see docs on export pitfalls).

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

    Written as a broadcast product and a sum, not a matrix product: runtimes that lower a graph's precision
    themselves (OpenVINO's bf16 on CPU matrix engines) lower every matrix product, but keep the elementwise ops and
    reductions that feed an integer result (here the argmax) in fp32. The scores are small (|A| x |B| x head_dim).
    """
    with full_precision(metric.device):
        metric = metric.float()
        metric = metric / torch.linalg.vector_norm(metric, dim=-1, keepdim=True).clamp_min(1e-6)
        a, b = metric.index_select(1, a_idx), metric.index_select(1, b_idx)
        scores = (a.unsqueeze(2) * b.unsqueeze(1)).sum(dim=-1)
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
def _layout(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[list[bool], list[int], list[int], list[int]]:
    """Per sequence position: whether it is in B, its index in B, its index in A (0 in B), and its column among
    [the B tokens, then the A tokens]."""
    in_b = [False] * (len(a) + len(b))
    b_pos, a_pos, column = [0] * len(in_b), [0] * len(in_b), [0] * len(in_b)
    for i, position in enumerate(b):
        in_b[position], b_pos[position], column[position] = True, i, i
    for i, position in enumerate(a):
        a_pos[position], column[position] = i, len(b) + i
    return in_b, b_pos, a_pos, column


def destinations(scores: Tensor, a_idx: Tensor, b_idx: Tensor, k: int) -> Tensor:
    """[B, N] int64, per input token the output token it joins. Output order: the B tokens (cls first), then the A
    tokens kept, best matched first; the k A tokens with the strongest best match (all of A for k = |A|, as in
    FPET; ToMe's r otherwise) join their best B token, the others are kept."""
    n_a, n_b = a_idx.numel(), b_idx.numel()
    row = scores.argmax(dim=-1)  # [B, |A|]: each A token's best B token
    if k < n_a:
        rank = scores.max(dim=-1).values.argsort(dim=-1, descending=True).argsort(dim=-1)
        row = torch.where(rank < k, row, n_b + rank - k)
    in_b, b_pos, a_pos, _ = _layout(tuple(a_idx.tolist()), tuple(b_idx.tolist()))
    device = scores.device
    return torch.where(torch.tensor(in_b, device=device), torch.tensor(b_pos, device=device),
                       row.index_select(1, torch.tensor(a_pos, device=device)))  # fmt: skip


def merge_matrix(scores: Tensor, dest: Tensor, a_idx: Tensor, b_idx: Tensor, k: int, learned: bool) -> Tensor:
    """[B, tokens out, tokens in], 0/1 in the forward pass: output token j is the union of the input tokens in row j
    (`dest`: the `destinations` of these scores). `learned` adds FPET's straight-through gradient to the rows, zero
    in the forward pass, so the matching trains through the merge; deployment (and ToMe) takes the hard rows alone."""
    n_a, n_b = a_idx.numel(), b_idx.numel()
    n_out = n_a + n_b - k
    rows = (dest.unsqueeze(1) == torch.arange(n_out, device=scores.device).unsqueeze(-1)).float()
    if not learned:
        return rows
    assign = fpet_assignment(scores)
    gradient = (assign - assign.detach()).transpose(-1, -2)  # [B, |B|, |A|], zero
    if k < n_a:  # only the rows that merge learn from it
        gradient = gradient * (dest.index_select(1, a_idx) < n_b).unsqueeze(1)
    columns = _layout(tuple(a_idx.tolist()), tuple(b_idx.tolist()))[3]
    top = torch.cat([gradient.new_zeros(gradient.shape[0], n_b, n_b), gradient], dim=-1)
    top = top.index_select(-1, torch.tensor(columns, device=scores.device))
    return rows + torch.cat([top, top.new_zeros(top.shape[0], n_out - n_b, top.shape[-1])], dim=1)


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
    """Merge k of the A tokens into B by size-weighted mean; returns the tokens, their sizes and `groups`.

    `size` None: every token stands for one patch (before the first merge). The mixing weights are built from the
    merge matrix and the sizes, normalised (at most 1, summing to 1 per output token) so that the products stay in
    the tokens' range in fp16, then cast to the tokens' precision: the only op that touches the tokens is one matrix
    product in their own precision (cls aside), with no gather, no scatter and no fp32 elementwise op on the token path.

    `groups` ([B, patches], int64: the token each original patch is in) follows each input token to its output
    token by gathers. As a graph output (the merge maps) it ties the matching to the graph's tail with no matrix
    product between them, and runtimes keep a graph's tail in fp32 when they lower the rest (OpenVINO's CPU plugin
    does for bf16 and fp16): that is what holds the matching in fp32 in an fp32 graph compiled for bf16.
    """
    dest = destinations(scores, a_idx, b_idx, k)
    with full_precision(x.device):
        rows = merge_matrix(scores, dest, a_idx, b_idx, k, learned)
        weighted = rows if size is None else rows * size.float().transpose(-1, -2)
        new_size = weighted.sum(dim=-1, keepdim=True)
        weights = weighted / new_size
    # cls (first in and out) merges with nothing: leaving it out of the product keeps the inner dimension at the
    # patch count, even on the usual grids, which AMX's bf16 tiles need (65 runs 2-3x slower than 64 in OpenVINO)
    merged = torch.cat([x[:, :1], weights[:, 1:, 1:].to(x.dtype) @ x[:, 1:]], dim=1)
    if groups is not None:
        groups = dest.gather(1, groups)
    return merged, new_size, groups


def initial_groups(batch: int, patches: int, device: torch.device) -> Tensor:
    """[B, patches]: before any merge each patch is its own token, after cls."""
    return torch.arange(1, patches + 1, device=device).expand(batch, -1)


def size_bias(size: Tensor, dtype: torch.dtype) -> Tensor:
    """Proportional attention: log(size) of each key, shaped to add to [B, heads, N, N] logits of `dtype`.
    Computed once per merge point (in fp32, then cast) and shared by the blocks that follow it."""
    return size.log().transpose(-1, -2).unsqueeze(1).to(dtype)
