"""Token merging maths as pure tensor functions: splits, matching and the size-weighted merge.

Shapes: x [B, N, C] with cls at index 0, size [B, N, 1] (how many original patches each token stands for),
metric [B, N, c]. Index tensors are static (they depend only on shapes), so exported graphs keep static shapes and
use no scatter ops: the merge is a dense one-hot matmul, which exports exactly (see docs on export pitfalls).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

# Index sets are built from Python lists, so a traced or exported graph holds them as constants.


@functools.lru_cache(maxsize=64)
def checkerboard_split(h: int, w: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Sequence indices of set A (patch cells with row + col even) and set B (cls, then the other cells)."""
    cells = [(1 + r * w + c, (r + c) % 2 == 0) for r in range(h) for c in range(w)]
    a = [i for i, even in cells if even]
    b = [0] + [i for i, even in cells if not even]
    return torch.tensor(a, device=device), torch.tensor(b, device=device)


@functools.lru_cache(maxsize=64)
def alternate_split(n: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """A = patch tokens at odd sequence positions, B = cls and the even positions (used once the grid is gone)."""
    return torch.tensor(range(1, n, 2), device=device), torch.tensor(range(0, n, 2), device=device)


def similarity(metric: Tensor, a_idx: Tensor, b_idx: Tensor) -> Tensor:
    """Cosine similarity A x B; the cls column (B's first) is -inf so nothing merges into cls."""
    metric = metric / torch.linalg.vector_norm(metric, dim=-1, keepdim=True).clamp_min(1e-6)
    a, b = metric.index_select(1, a_idx), metric.index_select(1, b_idx)
    scores = a @ b.transpose(-1, -2)
    return torch.cat([torch.full_like(scores[..., :1], float("-inf")), scores[..., 1:]], dim=-1)


def hard_assignment(scores: Tensor) -> Tensor:
    """One-hot of each row's argmax. argmax breaks exact ties (first index) where `soft > 0.5` would drop the row."""
    best = scores.argmax(dim=-1, keepdim=True)
    columns = torch.arange(scores.shape[-1], device=scores.device)
    return (best == columns).to(scores.dtype)


def fpet_assignment(scores: Tensor) -> Tensor:
    """FPET's straight-through assignment: the forward pass is the hard one-hot, the backward pass is sigmoid's.

    soft = sigmoid(S - m) with m the mean of each row's top-2 scores, so only the best match sits above 0.5.
    """
    m = scores.topk(2, dim=-1).values.mean(dim=-1, keepdim=True)
    soft = torch.sigmoid(scores - m)
    return soft + (hard_assignment(scores) - soft).detach()


def select_rows(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Rows of A to merge (the k with the strongest best match, as ToMe) and the rows to keep."""
    order = scores.max(dim=-1).values.argsort(dim=-1, descending=True)
    return order[:, :k], order[:, k:]


def gather_rows(t: Tensor, rows: Tensor) -> Tensor:
    """t[b, rows[b]] for every batch element, as a gather with static shapes."""
    return t.gather(1, rows.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


def weighted_merge(x_src: Tensor, s_src: Tensor, x_dst: Tensor, s_dst: Tensor, assign: Tensor) -> tuple[Tensor, Tensor]:
    """Size-weighted mean of each destination with the sources assigned to it (assign [B, |src|, |dst|])."""
    to_dst = assign.transpose(-1, -2)
    new_size = s_dst + to_dst @ s_src
    merged = (x_dst * s_dst + to_dst @ (x_src * s_src)) / new_size
    return merged, new_size


def merge_tokens(
    x: Tensor, size: Tensor, scores: Tensor, a_idx: Tensor, b_idx: Tensor, k: int, learned: bool
) -> tuple[Tensor, Tensor]:
    """Merge k of the A tokens into B. Output: B tokens (cls first), then the A tokens kept; sizes alike.

    `learned` selects FPET's straight-through assignment (for training); otherwise the hard one-hot (ToMe, and
    FPET at deployment, where both agree in the forward pass).
    """
    x_a, x_b = x.index_select(1, a_idx), x.index_select(1, b_idx)
    s_a, s_b = size.index_select(1, a_idx), size.index_select(1, b_idx)
    keep_x = keep_s = None
    if k < a_idx.numel():
        src, keep = select_rows(scores, k)
        scores = gather_rows(scores, src)
        keep_x, keep_s = gather_rows(x_a, keep), gather_rows(s_a, keep)
        x_a, s_a = gather_rows(x_a, src), gather_rows(s_a, src)
    assign = fpet_assignment(scores) if learned else hard_assignment(scores)
    x_b, s_b = weighted_merge(x_a, s_a, x_b, s_b, assign)
    if keep_x is None:
        return x_b, s_b
    return torch.cat([x_b, keep_x], dim=1), torch.cat([s_b, keep_s], dim=1)


def size_bias(size: Tensor) -> Tensor:
    """Proportional attention: log(size) of each key, shaped to add to [B, heads, N, N] logits."""
    return size.log().transpose(-1, -2).unsqueeze(1)
