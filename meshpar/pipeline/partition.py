"""Splitting a sequence of blocks into pipeline stages.

A model is a list of ``n`` blocks. A partition is a list of ``S`` half-open ranges
``[(start, end), ...]`` that cover ``0..n`` in order, each non-empty. ``S`` is the number of
*virtual* stages: ``pipe_size * chunks``. Virtual stage ``s`` runs on pipe rank ``s % pipe_size``
as that rank's chunk ``s // pipe_size`` (the Megatron interleaved placement; with one chunk per
rank, stage ``s`` is simply rank ``s``).

Three methods:

* ``"uniform"``: equal numbers of blocks (the first ``n % S`` stages get one more).
* ``"parameters"``: contiguous split minimising the largest stage's parameter count
  (exact, by dynamic programming over prefix sums). Costs may also be given directly.
* explicit boundaries: a list of ``S - 1`` increasing cut indices, e.g. ``[2, 5, 7]`` for
  four stages ``[0,2) [2,5) [5,7) [7,n)``.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from ..errors import ShardingError

Ranges = list[tuple[int, int]]


def stage_of(virtual_stage: int, pipe_size: int) -> tuple[int, int]:
    """``(pipe rank, chunk)`` that runs ``virtual_stage``."""
    return virtual_stage % pipe_size, virtual_stage // pipe_size


def virtual_stage(rank: int, chunk: int, pipe_size: int) -> int:
    """Index of the virtual stage run by ``rank`` as its ``chunk``."""
    return chunk * pipe_size + rank


def _check_counts(n_blocks: int, n_stages: int) -> None:
    if n_stages < 1:
        raise ShardingError(f"need at least one pipeline stage, got {n_stages}")
    if n_stages > n_blocks:
        raise ShardingError(
            f"cannot split {n_blocks} blocks into {n_stages} pipeline stages (pipe size x chunks): "
            f"every stage needs at least one block. Use fewer chunks, a smaller 'pipe' axis, "
            f"or split the model into more blocks.")


def uniform(n_blocks: int, n_stages: int) -> Ranges:
    """Equal numbers of blocks per stage; the first ``n_blocks % n_stages`` stages get one more."""
    _check_counts(n_blocks, n_stages)
    q, r = divmod(n_blocks, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        end = start + q + (1 if s < r else 0)
        out.append((start, end))
        start = end
    return out


def balanced(costs: Sequence[float], n_stages: int) -> Ranges:
    """Contiguous split of ``costs`` into ``n_stages`` non-empty ranges minimising the largest sum.

    Exact (O(n^2 S) dynamic programming). Ties prefer earlier, smaller stages.
    """
    n = len(costs)
    _check_counts(n, n_stages)
    if any(c < 0 for c in costs):
        raise ShardingError(f"block costs must be non-negative, got {list(costs)}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[s][i]: minimal max-cost splitting blocks[:i] into s stages; cut[s][i]: start of stage s-1
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, n_stages + 1):
        for i in range(s, n - (n_stages - s) + 1):
            for j in range(s - 1, i):
                v = max(best[s - 1][j], prefix[i] - prefix[j])
                if v < best[s][i]:
                    best[s][i], cut[s][i] = v, j
    out, i = [], n
    for s in range(n_stages, 0, -1):
        j = cut[s][i]
        out.append((j, i))
        i = j
    return out[::-1]


def from_boundaries(boundaries: Sequence[int], n_blocks: int, n_stages: int) -> Ranges:
    """Ranges from ``n_stages - 1`` strictly increasing cut indices in ``1..n_blocks-1``."""
    _check_counts(n_blocks, n_stages)
    cuts = [int(b) for b in boundaries]
    if len(cuts) != n_stages - 1:
        raise ShardingError(
            f"explicit partition {cuts} has {len(cuts)} boundaries; {n_stages} stages need {n_stages - 1} "
            f"(cut indices between blocks, e.g. {[ (k + 1) * n_blocks // n_stages for k in range(n_stages - 1)]})")
    edges = [0] + cuts + [n_blocks]
    for a, b in zip(edges, edges[1:]):
        if not a < b:
            raise ShardingError(
                f"explicit partition {cuts} must be strictly increasing within 1..{n_blocks - 1} "
                f"so that every stage gets at least one block")
    return list(zip(edges, edges[1:]))


def param_count(block: object) -> int:
    """Number of parameter elements of an ``nn.Module`` (0 for anything else)."""
    if isinstance(block, nn.Module):
        return sum(p.numel() for p in block.parameters())
    return 0


def partition(blocks_or_count: Sequence[object] | int, n_stages: int,
              method: str | Sequence[int] = "uniform", costs: Sequence[float] | None = None) -> Ranges:
    """Split blocks into ``n_stages`` contiguous ranges.

    Args:
        blocks_or_count: the blocks (needed for ``"parameters"``) or just their number.
        n_stages: number of virtual stages (pipe size x chunks per rank).
        method: ``"uniform"``, ``"parameters"`` (balance parameter counts, or ``costs`` when
            given), or a list of ``n_stages - 1`` cut indices.
        costs: optional per-block cost used by ``"parameters"`` instead of parameter counts.
    """
    if isinstance(blocks_or_count, int):
        n, blocks = blocks_or_count, None
    else:
        blocks = list(blocks_or_count)
        n = len(blocks)
    if isinstance(method, str):
        if method == "uniform":
            return uniform(n, n_stages)
        if method in ("parameters", "balanced"):
            if costs is None:
                if blocks is None:
                    raise ShardingError("partition='parameters' needs the blocks (or costs=...), not a block count")
                costs = [param_count(b) for b in blocks]
            if len(costs) != n:
                raise ShardingError(f"got {len(costs)} costs for {n} blocks")
            return balanced(costs, n_stages)
        raise ShardingError(f"unknown partition method {method!r}: use 'uniform', 'parameters' or a list of cut indices")
    return from_boundaries(method, n, n_stages)
