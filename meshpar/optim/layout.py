"""Flat, evenly padded buckets: the ZeRO layout of parameters, gradients and optimizer state.

A bucket concatenates the local blocks of some parameters (same param group, same dtype) into
one flat vector of ``numel`` elements, padded with zeros to ``padded = shard * nd`` so that data
rank ``r`` owns the contiguous slice ``[r * shard, (r + 1) * shard)``. The owned slice is the
bucket's spec ``P("data")`` over the flat dimension; with tensor parallelism each local block is
already the TP block, so the state spec is the TP spec plus ``data``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .params import local_of


@dataclass
class Entry:
    """One parameter inside a bucket: ``flat[offset : offset + numel]`` viewed as ``shape``."""

    param: torch.Tensor
    name: str
    offset: int
    numel: int
    shape: torch.Size

    def range_in(self, lo: int, hi: int) -> tuple[int, int] | None:
        """The part of ``[lo, hi)`` covered by this entry, as bucket offsets (None if empty)."""
        a, b = max(lo, self.offset), min(hi, self.offset + self.numel)
        return (a, b) if a < b else None


@dataclass
class Bucket:
    """A flat bucket of parameters with its buffers (all tensors are local to this rank)."""

    index: int
    group: int
    dtype: torch.dtype
    entries: list[Entry]
    numel: int
    padded: int
    shard: int
    owner: int  # this rank's index along the data axis
    flat: torch.Tensor | None = None            # params: full (stages 0-2) or own shard (stage 3)
    master: torch.Tensor | None = None          # what the inner optimizer steps
    grad_buf: torch.Tensor | None = None        # local (unreduced) grads being accumulated, full size
    grad: torch.Tensor | None = None            # reduced grads: full (stages 0-1) or own shard (2-3)
    pending: Any = None                         # in-flight reduction
    seen: set = field(default_factory=set)      # ids of params whose grad arrived in this backward
    launched: bool = False
    gathered: torch.Tensor | None = None        # stage 3: the full flat params while in use
    gather_pending: Any = None

    @property
    def lo(self) -> int:
        return self.owner * self.shard

    @property
    def hi(self) -> int:
        return self.lo + self.shard


def plan_buckets(named: Sequence[tuple[int, str, torch.Tensor]], nd: int, owner: int, bucket_bytes: int,
                 *, split_every: bool = False) -> list[Bucket]:
    """Group ``(param_group, name, param)`` triples, in the given order, into buckets.

    A new bucket starts when the param group or dtype changes, when the bucket would exceed
    ``bucket_bytes`` (a bucket always takes at least one parameter), or at every ``None`` name
    marker when ``split_every`` (stage 3 uses one bucket per module).
    """
    buckets: list[Bucket] = []
    cur: list[tuple[str, torch.Tensor]] = []
    key: tuple | None = None

    def close() -> None:
        nonlocal cur
        if not cur:
            return
        entries, off = [], 0
        for name, p in cur:
            loc = local_of(p)
            entries.append(Entry(p, name, off, loc.numel(), loc.shape))
            off += loc.numel()
        shard = max(1, math.ceil(off / nd))
        buckets.append(Bucket(len(buckets), key[0], key[1], entries, off, shard * nd, shard, owner))
        cur = []

    size = 0
    for g, name, p in named:
        if p is None:
            if split_every:
                close()
                size = 0
            continue
        loc = local_of(p)
        k = (g, loc.dtype)
        nbytes = loc.numel() * loc.element_size()
        if cur and (k != key or size + nbytes > bucket_bytes):
            close()
            size = 0
        key = k
        cur.append((name, p))
        size += nbytes
    close()
    return buckets
