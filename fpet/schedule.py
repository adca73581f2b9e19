"""Merge schedules: the one place the spec strings (`6:0.5`, `3:0.5,6:0.5`, `tome:13`, `none`) are parsed.

A schedule lists merge points. Each point sits inside a block, after the attention residual and before the MLP,
and merges some patch tokens into others. `plan()` turns a schedule into static token counts for a given model, so
the model, the cost model, `describe`, training, export and the benchmarks all agree on the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from fpet.errors import FpetError

Method = Literal["fpet", "tome"]
Split = Literal["checkerboard", "alternate"]
MAX_FRACTION = 0.5  # bipartite matching can merge at most the A half of the patch tokens


@dataclass(frozen=True)
class MergePoint:
    """`amount` is a fraction (float, 0 < f <= 0.5) of the patch tokens entering the merge, or a count (int)."""

    block: int | None  # None: every block (ToMe's `tome:r`)
    amount: float | int
    method: Method = "fpet"

    def __str__(self) -> str:
        amount = repr(self.amount) if isinstance(self.amount, float) else str(self.amount)
        if self.block is None:
            return f"{self.method}:{amount}"
        prefix = "" if self.method == "fpet" else f"{self.method}:"
        return f"{prefix}{self.block}:{amount}"


@dataclass(frozen=True)
class MergeSchedule:
    points: tuple[MergePoint, ...] = ()

    @property
    def spec(self) -> str:
        return ",".join(str(p) for p in self.points) or "none"

    def __str__(self) -> str:
        return self.spec

    def per_block(self, depth: int) -> list[MergePoint | None]:
        """The point acting in each block, with `tome:r` expanded to every block."""
        blocks: list[MergePoint | None] = [None] * depth
        for p in self.points:
            targets = range(depth) if p.block is None else [p.block]
            if p.block is not None and not 0 <= p.block < depth:
                raise FpetError(
                    f"schedule {self.spec!r}: block {p.block} does not exist (the model has {depth} blocks)"
                )
            for b in targets:
                if blocks[b] is not None:
                    raise FpetError(f"schedule {self.spec!r}: block {b} has more than one merge point")
                blocks[b] = MergePoint(b, p.amount, p.method)
        return blocks


def _parse_amount(text: str, item: str) -> float | int:
    try:
        if "." in text:
            value: float | int = float(text)
            if not 0.0 < value <= MAX_FRACTION:
                raise FpetError(f"schedule item {item!r}: a fraction must lie in (0, {MAX_FRACTION}]")
            return value
        value = int(text)
    except ValueError:
        raise FpetError(
            f"schedule item {item!r}: {text!r} is neither a fraction like 0.5 nor a count like 13"
        ) from None
    if value < 1:
        raise FpetError(f"schedule item {item!r}: a token count must be at least 1")
    return value


def _parse_block(text: str, item: str) -> int:
    if not (text.isascii() and text.isdigit()):  # isdigit alone takes "²", which int() refuses
        raise FpetError(f"schedule item {item!r}: block {text!r} is not a non-negative integer")
    return int(text)


def parse_schedule(spec: str | MergeSchedule | None) -> MergeSchedule:
    """Parse `none`, `6:0.5`, `3:0.5,6:0.5,9:0.5`, `tome:13` (every block), `tome:6:8`, `fpet:6:0.5`.

    `+` separates points too (`3:0.5+6:0.5`), for lists of schedules that are themselves comma-separated.
    """
    if isinstance(spec, MergeSchedule):
        return spec
    text = (spec or "none").strip().lower()
    if text in ("", "none"):
        return MergeSchedule()
    points = []
    for item in (part.strip() for part in text.replace("+", ",").split(",")):
        fields = item.split(":")
        method: Method = "fpet"
        if fields[0] in ("fpet", "tome"):
            method = fields.pop(0)  # type: ignore[assignment]
        if len(fields) == 1 and method == "tome":
            points.append(MergePoint(None, _parse_amount(fields[0], item), "tome"))
        elif len(fields) == 2:
            points.append(MergePoint(_parse_block(fields[0], item), _parse_amount(fields[1], item), method))
        else:
            raise FpetError(
                f"schedule item {item!r} is malformed; expected BLOCK:AMOUNT (e.g. 6:0.5), tome:R or tome:BLOCK:AMOUNT"
            )
    return MergeSchedule(tuple(points))


@dataclass(frozen=True)
class MergeStep:
    """Static shapes of one merge: |A| candidates, |B| destinations (cls first), `merged` of A actually merged."""

    block: int
    method: Method
    tokens_in: int
    n_a: int
    n_b: int
    merged: int
    grid: tuple[int, int] | None = None  # set when the patch grid is still intact: FPET's checkerboard split

    @property
    def split(self) -> Split:
        return "checkerboard" if self.grid is not None else "alternate"

    @property
    def tokens_out(self) -> int:
        return self.tokens_in - self.merged


def split_sizes(split: Split, tokens: int, grid: tuple[int, int]) -> tuple[int, int]:
    """|A| and |B| (cls included in B) for `tokens` tokens, cls first."""
    patches = tokens - 1
    if split == "checkerboard":
        h, w = grid
        n_a = sum(1 for r in range(h) for c in range(w) if (r + c) % 2 == 0)
        return n_a, 1 + patches - n_a
    return math.ceil(patches / 2), 1 + patches // 2


def plan(schedule: MergeSchedule, depth: int, grid: tuple[int, int]) -> list[MergeStep | None]:
    """One entry per block: the merge it performs, with static token counts, or None."""
    tokens = grid[0] * grid[1] + 1
    steps: list[MergeStep | None] = []
    grid_intact = True
    for point in schedule.per_block(depth):
        if point is None:
            steps.append(None)
            continue
        split: Split = "checkerboard" if point.method == "fpet" and grid_intact else "alternate"
        n_a, n_b = split_sizes(split, tokens, grid)
        patches = tokens - 1
        merged = math.floor(point.amount * patches) if isinstance(point.amount, float) else point.amount
        where = f"schedule {schedule.spec!r}: the {point.method} merge in block {point.block}"
        if merged < 1:
            raise FpetError(f"{where} merges no token ({point.amount} of {patches} patch tokens)")
        if merged > n_a:
            raise FpetError(f"{where} asks for {merged} tokens but only {n_a} of the {tokens} tokens can merge there")
        if tokens - merged < 2:
            raise FpetError(f"{where} would leave fewer than 2 tokens ({tokens} tokens enter it)")
        min_b = 3 if point.method == "fpet" else 2  # FPET's top-2 mean needs two destinations besides cls
        if n_b < min_b:
            raise FpetError(f"{where} has {n_b - 1} destination tokens besides cls; it needs {min_b - 1}")
        step_grid = grid if split == "checkerboard" else None
        steps.append(MergeStep(point.block, point.method, tokens, n_a, n_b, merged, step_grid))  # type: ignore[arg-type]
        tokens -= merged
        grid_intact = False
    return steps


def tokens_per_block(steps: list[MergeStep | None], grid: tuple[int, int]) -> list[int]:
    """Tokens entering each block (the merge inside a block acts after its attention)."""
    tokens = grid[0] * grid[1] + 1
    counts = []
    for step in steps:
        counts.append(tokens)
        if step is not None:
            tokens = step.tokens_out
    return counts
