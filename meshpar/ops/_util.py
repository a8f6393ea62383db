"""Helpers shared by op rules."""
from __future__ import annotations

from typing import Iterable

import torch
from torch.utils._pytree import tree_flatten

from ..errors import ShardingError
from ..mesh import Mesh
from ..sharding.tensor import ShardedTensor


def sharded_args(args, kwargs=None) -> list[ShardedTensor]:
    flat, _ = tree_flatten((args, kwargs or {}))
    return [a for a in flat if isinstance(a, ShardedTensor)]


def common_mesh(sts: Iterable[ShardedTensor]) -> Mesh:
    sts = list(sts)
    mesh = sts[0].mesh
    for s in sts[1:]:
        if s.mesh != mesh:
            raise ShardingError(f"operands live on different meshes ({mesh} and {s.mesh}); "
                                "reshard them onto one mesh (unshard + shard) first")
    return mesh


def gshape(x) -> torch.Size:
    """Global shape of a ShardedTensor or plain tensor."""
    return x._gshape if isinstance(x, ShardedTensor) else x.shape


def norm_dim(d: int, ndim: int) -> int:
    if not -max(ndim, 1) <= d < max(ndim, 1):
        raise IndexError(f"dimension {d} out of range for a {ndim}-d tensor")
    return d % max(ndim, 1)


def norm_dims(dim, ndim: int) -> tuple[int, ...]:
    if dim is None:
        return tuple(range(ndim))
    if isinstance(dim, int):
        return (norm_dim(dim, ndim),)
    return tuple(sorted(norm_dim(d, ndim) for d in dim))


def no_grad_needed() -> bool:
    return not torch.is_grad_enabled()
