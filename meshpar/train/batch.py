"""The batch contract: what a data rank's batch is, how the engine places it, and a debug check.

**Contract.** The dataloader (:func:`~meshpar.train.data.get_dataloader`) yields each *data
rank's own* batch: rows ``[r * b, (r + 1) * b)`` of the global batch of ``n * b`` rows, where ``r``
is this rank's coordinate on the ``data`` axis and ``n`` its size. Every rank of one data group
(the tensor / sequence / pipeline peers, which share ``r``) gets the same rows. So a batch tensor
``x [b, ...]`` is this rank's block of the global batch ``[n * b, ...]`` laid out ``P("data")``::

    X = meshpar.from_local(x, P("data"), mesh)     # global shape [n * b, ...]

The engine does exactly this (:func:`place_batch`) for a model with ShardedTensor parameters
before calling it, and for the labels before the criterion. A model then refines the layout it
needs (``P(("data", "x"))`` in 2D, ``P("data", "sp")`` with a split sequence...), which is a free
local slice. ``shard(x, P(...))`` of a per-rank batch would treat it as the *global* batch and keep
only a slice of it on each rank: rows are silently lost.

A plain model (no ShardedTensor parameters, pure data parallelism) gets the plain per-rank
tensors, as with DDP.

**Debug check** (:func:`check_replicas`, on with ``initialize(..., debug=True)`` or
``MESHPAR_DEBUG=1``): every rank's block of a tensor must equal the blocks of the ranks that the
layout says hold the same block (all ranks differing only on axes the spec does not split). A
cheap checksum (two float64 numbers per tensor) is all-gathered over those axes and compared.
"""
from __future__ import annotations

import os
from typing import Any, Iterable

import torch
from torch.utils._pytree import tree_map

from ..errors import ShardingError
from ..mesh import Mesh, collectives as C
from ..sharding.api import from_local
from ..sharding.spec import P
from ..sharding.tensor import ShardedTensor

DATA_AXIS = "data"


def debug_default() -> bool:
    """The default of ``initialize(..., debug=None)``: the ``MESHPAR_DEBUG`` environment variable."""
    return os.environ.get("MESHPAR_DEBUG", "").lower() in ("1", "true", "yes", "on")


def batch_spec(mesh: Mesh, axis: str = DATA_AXIS) -> P:
    """The layout of a data rank's batch: ``P("data")`` (dim 0 split over the data axis), or ``P()``
    on a mesh without a data axis."""
    return P(axis) if axis in mesh.names else P()


def place(x: Any, mesh: Mesh, axis: str = DATA_AXIS) -> Any:
    """This rank's batch ``x`` (a tensor with the batch first) as its block of the global batch.

    ``x [b, ...]`` -> ShardedTensor ``[n * b, ...]`` with spec ``P("data")`` (``from_local``: no
    communication). A ShardedTensor is taken as is (it already says its layout); a 0-d tensor or a
    non-tensor is returned unchanged.
    """
    if isinstance(x, ShardedTensor) or not isinstance(x, torch.Tensor) or x.ndim == 0:
        return x
    return from_local(x, batch_spec(mesh, axis), mesh)


def place_batch(batch: Any, mesh: Mesh, axis: str = DATA_AXIS) -> Any:
    """:func:`place` applied to every tensor of a (nested) tuple / list / dict batch."""
    return tree_map(lambda t: place(t, mesh, axis), batch)


def _checksum(t: torch.Tensor) -> torch.Tensor:
    """Two float64 numbers that differ, in practice, whenever the blocks differ: the sum and a
    position-weighted sum (catches permutations)."""
    v = t.detach().reshape(-1)
    if v.is_complex():
        v = torch.view_as_real(v).reshape(-1)
    v = v.to(torch.float64)
    w = torch.arange(1, v.numel() + 1, dtype=torch.float64, device=v.device).remainder_(1009).add_(1)
    return torch.stack([v.sum(), (v * w).sum()])


def replicated_axes(x: torch.Tensor, mesh: Mesh, plain_axes: Iterable[str] | None = None,
                    skip_axes: Iterable[str] = ()) -> tuple[str, ...]:
    """The mesh axes over which ``x``'s block must be equal: those its spec neither splits nor leaves
    unreduced; for a plain tensor, ``plain_axes`` (default: every axis). ``skip_axes`` are never
    checked (e.g. "pipe": each pipeline stage holds other parameters)."""
    skip = set(skip_axes)
    if isinstance(x, ShardedTensor):
        used = set(x.spec.sharded_axes()) | set(x.spec.unreduced) | skip
        return tuple(a for a in mesh.names if a not in used and mesh.size(a) > 1)
    axes = mesh.names if plain_axes is None else tuple(plain_axes)
    return tuple(a for a in axes if a not in skip and mesh.size(a) > 1)


def check_replicas(tensors: dict[str, torch.Tensor], mesh: Mesh, *, what: str,
                   plain_axes: Iterable[str] | None = None, skip_axes: Iterable[str] = (), fix: str = "") -> None:
    """Raise :class:`ShardingError` when a tensor's block differs across ranks that should hold the same.

    Args:
        tensors: name -> tensor (ShardedTensors are checked over the axes their spec replicates;
            plain tensors over ``plain_axes``, default every mesh axis).
        what: how to call the tensors in the message (e.g. "batch", "parameter").
        fix: a sentence appended to the message.
    Collective over the checked axes (every rank must call it with the same names, in order).
    """
    plain_axes = tuple(plain_axes) if plain_axes is not None else None
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            continue
        axes = replicated_axes(t, mesh, plain_axes, skip_axes)
        if not axes:
            continue
        local = t._local if isinstance(t, ShardedTensor) else t
        s = _checksum(local)
        gathered = C.all_gather(s.reshape(1, 2), mesh, axes, 0)
        if not torch.allclose(gathered, s.reshape(1, 2).expand_as(gathered), rtol=1e-12, atol=0.0):
            layout = f"spec {t.spec}" if isinstance(t, ShardedTensor) else "a plain tensor"
            raise ShardingError(
                f"{what} {name!r} ({layout}, shape {tuple(t.shape)}) differs across the ranks of mesh axes {axes}, "
                f"which should hold the same block (checksums {gathered[:, 0].tolist()}). {fix}".rstrip())


__all__ = ["DATA_AXIS", "batch_spec", "place", "place_batch", "check_replicas", "replicated_axes", "debug_default"]
