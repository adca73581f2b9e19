"""Token redundancy reduction: the module that merges tokens inside a block, learned (FPET) or fixed (ToMe)."""

from __future__ import annotations

from torch import Tensor, nn

from fpet import merge
from fpet.pet import Bottleneck, per_task
from fpet.schedule import MergeStep

REFINE_WIDTH = 32


class TokenMerger(nn.Module):
    """Merges tokens after a block's attention, matching them on the head-averaged attention keys.

    FPET refines the detached keys with a small 1-bit adapter (k' = k + Adapter(k)), so the matching is learned
    end to end through a straight-through estimator while the backbone's keys get no gradient from it. ToMe
    matches on the raw keys with no parameters. In deployment mode only the hard assignment is computed.
    """

    def __init__(self, method: str, head_dim: int, dropout: float = 0.1):
        super().__init__()
        self.method = method
        self.refine = Bottleneck(head_dim, REFINE_WIDTH, dropout=dropout, binary=True) if method == "fpet" else None
        self.deploy = False

    def forward(
        self,
        x: Tensor,
        size: Tensor | None,
        keys: Tensor,
        step: MergeStep,
        groups: Tensor | None = None,
        task: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        metric = keys.detach()
        if self.refine is not None:
            metric = metric + per_task(self.refine, metric, task)
        if step.grid is not None:
            a_idx, b_idx = merge.checkerboard_split(*step.grid, x.device)
        else:
            a_idx, b_idx = merge.alternate_split(step.tokens_in, x.device)
        scores = merge.similarity(metric, a_idx, b_idx)
        learned = self.refine is not None and not self.deploy
        return merge.merge_tokens(x, size, scores, a_idx, b_idx, step.merged, learned, groups)
