"""Sequence layouts over a ring of ``sp`` ranks, and the block schedule of ring attention.

Contiguous layout: the sequence is cut into ``sp`` chunks; rank ``r`` holds chunk ``r``.

Balanced (zigzag, head-tail) layout: the sequence is cut into ``2*sp`` chunks; rank ``r`` holds
chunks ``r`` and ``2*sp-1-r``, in that order. With a causal mask every rank then does the same
amount of work::

    chunks   0  1  2  3  4  5  6  7          (sp = 4)
    rank     0  1  2  3  3  2  1  0

:func:`zigzag_permute` reorders a global tensor so that an ordinary contiguous shard gives every
rank its two chunks; :func:`zigzag_unpermute` is its inverse. ShardedTensors carry the layout in
their spec instead (``P(None, None, meshpar.Zigzag("sp"), None)``, see :mod:`meshpar.sharding.zigzag`)
and ``shard``/``unshard`` do the permutation.
"""
from __future__ import annotations

import dataclasses

import torch

from ...errors import ShardingError
from ...sharding.zigzag import natural_index, storage_index


def chunk_ids(rank: int, sp: int, balanced: bool) -> tuple[int, ...]:
    """Global chunk ids held by ``rank``, in local order (always ascending)."""
    return (rank, 2 * sp - 1 - rank) if balanced else (rank,)


def zigzag_order(sp: int) -> list[int]:
    """Chunk ids in balanced storage order: ``[0, 2sp-1, 1, 2sp-2, ...]``."""
    return [c for r in range(sp) for c in chunk_ids(r, sp, True)]


def zigzag_index(seq_len: int, sp: int, *, inverse: bool = False, device: torch.device | None = None) -> torch.Tensor:
    """Index ``idx`` with ``permuted = x.index_select(dim, idx)`` (or its inverse when ``inverse``)."""
    check_balanced_len(seq_len, sp, what="sequence length")
    return natural_index(seq_len, sp, device) if inverse else storage_index(seq_len, sp, device)


def zigzag_permute(x: torch.Tensor, sp: int, dim: int = 2) -> torch.Tensor:
    """Natural order -> balanced storage order along ``dim`` (global tensor, differentiable).

    Shard the result contiguously over the ``sp`` axis (``P(None, None, "sp", None)`` for
    ``[B, H, S, D]``) and rank ``r`` holds chunks ``r`` and ``2*sp-1-r``.
    """
    dim = dim % x.ndim
    return x.index_select(dim, zigzag_index(x.shape[dim], sp, device=x.device))


def zigzag_unpermute(x: torch.Tensor, sp: int, dim: int = 2) -> torch.Tensor:
    """Inverse of :func:`zigzag_permute`: balanced storage order -> natural order along ``dim``."""
    dim = dim % x.ndim
    return x.index_select(dim, zigzag_index(x.shape[dim], sp, inverse=True, device=x.device))


def check_balanced_len(seq_len: int, sp: int, what: str = "sequence length") -> None:
    """Raise :class:`ShardingError` unless ``seq_len`` splits into ``2*sp`` equal chunks."""
    if seq_len % (2 * sp):
        raise ShardingError(
            f"the balanced (zigzag) causal layout cuts the {what} {seq_len} into 2*sp = {2 * sp} equal chunks, "
            f"but {seq_len} % {2 * sp} = {seq_len % (2 * sp)}; pad the sequence to a multiple of {2 * sp} "
            "(e.g. meshpar.ops.attention.pad_to_multiple) or use the contiguous layout (a plain axis name "
            "instead of meshpar.Zigzag)")


@dataclasses.dataclass(frozen=True)
class Block:
    """One kernel call of a ring step: local query rows ``q`` against rows ``kv`` of the visiting
    K/V block, with a causal (diagonal) mask or none."""

    q: slice
    kv: slice
    causal: bool

    def work(self, chunk: int) -> int:
        """Work in half chunk-pairs: a full chunk pair counts 2, a diagonal (causal) one 1."""
        nq = (self.q.stop - self.q.start) // chunk
        nk = (self.kv.stop - self.kv.start) // chunk
        return nq * nk if self.causal else 2 * nq * nk


def step_blocks(me: int, src: int, sp: int, *, causal: bool, balanced: bool, q_len: int,
                kv_len: int) -> list[Block]:
    """Kernel calls rank ``me`` makes when it holds the K/V block of rank ``src``.

    Chunk pairs (query chunk ``a``, key chunk ``b``) are full when ``b < a`` (or not causal),
    diagonal when ``a == b`` and skipped when ``b > a``. Because local chunk order is ascending
    in both layouts, the own block (``src == me``) is one causal call; other blocks are merged
    into as few rectangular calls as the needed pairs allow (one per step in both layouts).
    """
    if not causal:
        return [Block(slice(0, q_len), slice(0, kv_len), False)]
    if src == me:
        return [Block(slice(0, q_len), slice(0, kv_len), True)]
    qc, kc = chunk_ids(me, sp, balanced), chunk_ids(src, sp, balanced)
    cq, ck = q_len // len(qc), kv_len // len(kc)
    rows: list[tuple[int, tuple[int, int] | None]] = []
    for i, a in enumerate(qc):
        need = [j for j, b in enumerate(kc) if b < a]
        if need and need != list(range(need[0], need[-1] + 1)):  # pragma: no cover - layouts above never do this
            raise AssertionError("non-contiguous key chunks in a ring step")
        rows.append((i, (need[0], need[-1] + 1) if need else None))
    blocks: list[Block] = []
    i = 0
    while i < len(rows):
        rng = rows[i][1]
        j = i
        while j + 1 < len(rows) and rows[j + 1][1] == rng:
            j += 1
        if rng is not None:
            blocks.append(Block(slice(i * cq, (j + 1) * cq), slice(rng[0] * ck, rng[1] * ck), False))
        i = j + 1
    return blocks


def rank_work(me: int, sp: int, *, causal: bool, balanced: bool) -> int:
    """Total work of rank ``me`` over a whole ring pass, in half chunk-pairs (see :meth:`Block.work`)."""
    n = 2 if balanced else 1
    return sum(b.work(1) for s in range(sp)
               for b in step_blocks(me, (me - s) % sp, sp, causal=causal, balanced=balanced, q_len=n, kv_len=n))


def pad_to_multiple(x: torch.Tensor, multiple: int, dim: int = 2) -> tuple[torch.Tensor, int]:
    """Zero-pad ``dim`` of ``x`` at the end to a multiple of ``multiple``; returns ``(padded, pad)``.

    Causal attention over a right-padded sequence leaves the real rows unchanged (they never see
    later positions); drop the last ``pad`` rows of the output.
    """
    dim = dim % x.ndim
    pad = (-x.shape[dim]) % multiple
    if pad == 0:
        return x, 0
    widths = [0, 0] * (x.ndim - dim - 1) + [0, pad]
    return torch.nn.functional.pad(x, widths), pad
