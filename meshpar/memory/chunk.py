"""Chunks: fixed-size flat buffers that parameters (and optimizer states) are packed into.

A :class:`Chunk` has one payload at a time on the device (``device_payload``) and, once it has
been on the host, a host buffer (``host_payload``, pinned on CUDA) that is kept for reuse. Each
parameter is a :class:`TensorInfo`: a slice ``[offset, offset + numel)`` of one chunk plus a
:class:`TensorState` that drives movement (PatrickStar's tensor states):

=================  ============================================================================
state              meaning
=================  ============================================================================
``FREE``           the slot holds nothing valid yet (its optimizer step is in flight)
``COMPUTE``        an op is about to use it: the chunk must be on the device and may not move
``HOLD``           holds the parameter (compute dtype); the chunk may move
``HOLD_AFTER_BWD`` holds the parameter's *gradient* (the grad reuses the parameter's slot)
=================  ============================================================================
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..optim.params import local_of


class TensorState(str, enum.Enum):
    FREE = "free"
    COMPUTE = "compute"
    HOLD = "hold"
    HOLD_AFTER_BWD = "hold_after_bwd"


@dataclass(eq=False)
class TensorInfo:
    """One parameter's slot in a chunk: ``chunk[offset : offset + numel].view(shape)``.

    For a ShardedTensor parameter the slot holds its local block (``shape`` is the block's shape).
    """

    name: str
    param: nn.Parameter
    chunk: "Chunk"
    offset: int
    numel: int
    shape: torch.Size
    state: TensorState = TensorState.HOLD
    has_grad: bool = False


@dataclass(eq=False)
class Chunk:
    """A flat buffer of ``numel`` elements of ``dtype``.

    ``kind`` is ``"param"`` (compute-dtype parameters, then their gradients) or an optimizer
    state (``"master"``, ``"exp_avg"``, ``"exp_avg_sq"``; those hold this rank's shard only).
    ``location`` is ``"device"`` or ``"host"``: where the valid payload is.
    """

    index: int
    numel: int
    dtype: torch.dtype
    kind: str = "param"
    tensors: list[TensorInfo] = field(default_factory=list)
    location: str = "host"
    device_payload: torch.Tensor | None = None
    host_payload: torch.Tensor | None = None
    host_valid: bool = True          # the host copy equals the device copy (eviction needs no download)
    pending: Any = None              # Event of an upload in flight
    host_event: Any = None           # Event of the download that last wrote host_payload
    busy: Any = None                 # Future of a host optimizer step writing host_payload
    pins: int = 0                    # units using it right now
    last_use: int = -1               # moment of the last access (LRU before a trace exists)

    def __post_init__(self) -> None:
        self.nbytes = self.numel * torch.empty((), dtype=self.dtype).element_size()

    @property
    def payload(self) -> torch.Tensor:
        """The valid payload (device when on the device, else host)."""
        p = self.device_payload if self.location == "device" else self.host_payload
        assert p is not None, f"chunk {self.index} ({self.kind}) has no payload on {self.location}"
        return p

    @property
    def movable(self) -> bool:
        return self.pins == 0 and not any(t.state == TensorState.COMPUTE for t in self.tensors)

    def states(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.state.value] = out.get(t.state.value, 0) + 1
        return out


def pack(named: list[tuple[str, nn.Parameter]], chunk_numel: int) -> list[list[tuple[str, nn.Parameter, int]]]:
    """Pack parameters, in the given (first-use) order, into chunks of ``chunk_numel`` elements.

    A parameter never straddles two chunks; a new chunk starts when the next one does not fit. A
    ShardedTensor parameter (tensor parallelism) takes the elements of its local block only.
    Returns, per chunk, ``(name, param, offset)`` triples.
    Raises:
        ValueError: a parameter larger than ``chunk_numel``.
    """
    chunks: list[list[tuple[str, nn.Parameter, int]]] = []
    used = chunk_numel
    for name, p in named:
        n = local_of(p).numel()
        if n > chunk_numel:
            raise ValueError(f"parameter {name} has {n} elements, more than the chunk size {chunk_numel}; "
                             f"use chunk_numel >= {n}")
        if used + n > chunk_numel:
            chunks.append([])
            used = 0
        chunks[-1].append((name, p, used))
        used += n
    return chunks


def default_chunk_numel(numels: list[int], multiple: int = 1, minimum: int = 0) -> int:
    """The chunk size with the least padding among a few candidates >= the largest parameter.

    Candidates are the largest parameter times 1, 1.25, 1.5, 2 (and ``minimum``), rounded up to
    ``multiple`` (the data-parallel size times 64, so shards stay aligned). Waste is the unused tail
    of every chunk when packing ``numels`` in order.
    """
    biggest = max(numels) if numels else 1
    cands = {max(minimum, int(biggest * f)) for f in (1.0, 1.25, 1.5, 2.0)}
    best, best_waste = None, None
    for c in sorted(cands):
        c = -(-c // multiple) * multiple
        n_chunks, used = 0, c
        for n in numels:
            if used + n > c:
                n_chunks, used = n_chunks + 1, 0
            used += n
        waste = n_chunks * c - sum(numels)
        if best_waste is None or waste < best_waste:
            best, best_waste = c, waste
    return int(best)
