"""Token merging maths as pure tensor functions: splits, matching and the size-weighted merge.

Shapes: x [B, N, C] with cls at index 0, size [B, N, 1] (how many original patches each token stands for, always
fp32), metric [B, N, c]. Index tensors are static (they depend only on shapes), so exported graphs keep static
shapes and use no scatter ops: the merge is a dense one-hot matmul, which exports exactly (see docs on export
pitfalls).

Matching runs in fp32 whatever the surrounding precision (fp16 graphs, bf16 or fp16 autocast): cosine scores of
near-identical tokens differ by less than half precision resolves near 1, and tied rows all go to the first column,
piling a flat background into one token.
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
    """Cosine similarity A x B in fp32; the cls column (B's first) is -inf so nothing merges into cls."""
    with full_precision(metric.device):
        metric = metric.float()
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
    """Size-weighted mean of each destination with the sources assigned to it (assign [B, |src|, |dst|]).

    The weights are normalised (each at most 1, summing to 1 per destination) before they touch the tokens, so the
    products stay in the tokens' range: multiplying by sizes first can overflow fp16 after large merges. Sizes and
    weights are fp32; the mixing runs in the tokens' precision.
    """
    with full_precision(assign.device):
        to_dst = assign.float().transpose(-1, -2)
        new_size = s_dst + to_dst @ s_src
        weights = to_dst * (s_src.transpose(-1, -2) / new_size)
        keep = s_dst / new_size
    merged = x_dst * keep.to(x_dst.dtype) + weights.to(x_src.dtype) @ x_src
    return merged, new_size


def merge_tokens(
    x: Tensor,
    size: Tensor,
    scores: Tensor,
    a_idx: Tensor,
    b_idx: Tensor,
    k: int,
    learned: bool,
    members: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Merge k of the A tokens into B. Output: B tokens (cls first), then the A tokens kept; sizes alike.

    `learned` selects FPET's straight-through assignment (for training); otherwise the hard one-hot (ToMe, and
    FPET at deployment, where both agree in the forward pass). `members` ([B, N, patches], 0/1: which original
    patches each token stands for) is carried through the same hard assignment when given, for merge maps.
    """
    src = keep = None
    if k < a_idx.numel():
        src, keep = select_rows(scores, k)
        scores = gather_rows(scores, src)
    assign = fpet_assignment(scores) if learned else hard_assignment(scores)

    def split(t: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """A rows to merge, B rows, A rows kept."""
        t_a, t_b = t.index_select(1, a_idx), t.index_select(1, b_idx)
        if src is None:
            return t_a, t_b, None
        return gather_rows(t_a, src), t_b, gather_rows(t_a, keep)

    def join(t_b: Tensor, t_kept: Tensor | None) -> Tensor:
        return t_b if t_kept is None else torch.cat([t_b, t_kept], dim=1)

    (x_a, x_b, x_kept), (s_a, s_b, s_kept) = split(x), split(size)
    x_b, s_b = weighted_merge(x_a, s_a, x_b, s_b, assign)
    if members is not None:
        m_a, m_b, m_kept = split(members)
        members = join(m_b + hard_assignment(scores).transpose(-1, -2) @ m_a, m_kept)
    return join(x_b, x_kept), join(s_b, s_kept), members


def initial_members(x: Tensor) -> Tensor:
    """[B, 1 + patches, patches]: each patch token stands for itself, cls for no patch."""
    patches = x.shape[1] - 1
    eye = torch.eye(patches, device=x.device)
    table = torch.cat([torch.zeros(1, patches, device=x.device), eye])
    return table.unsqueeze(0).expand(x.shape[0], -1, -1)


def patch_groups(members: Tensor) -> Tensor:
    """[B, patches]: the index of the token each original patch is in now."""
    return members.argmax(dim=1)


def size_bias(size: Tensor, dtype: torch.dtype) -> Tensor:
    """Proportional attention: log(size) of each key, shaped to add to [B, heads, N, N] logits of `dtype`."""
    return size.log().transpose(-1, -2).unsqueeze(1).to(dtype)
