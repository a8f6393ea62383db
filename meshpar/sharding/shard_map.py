"""shard_map: run a function on local blocks, with collectives by axis name inside.

``shard_map(f, mesh, in_specs, out_specs)(*args)``: each argument is brought to its in-spec
(``shard`` for plain tensors, ``reshard`` for ShardedTensors), ``f`` is called with the plain
local blocks (connected to autograd), and each output block is wrapped with its out-spec. Inside
``f`` use :mod:`meshpar.mesh.autograd` (psum, all_gather, ppermute, ...) by axis name.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import ShardingError
from ..mesh import Mesh
from .api import _as_spec, from_local, reshard, shard
from .core import enter
from .spec import P
from .tensor import ShardedTensor


def shard_map(f: Callable, mesh: Mesh, in_specs: Sequence[P | None], out_specs: Any) -> Callable:
    """Wrap ``f`` (a function of local blocks) into a function of global/sharded tensors.

    ``in_specs``: one spec per positional argument (``None`` passes a non-tensor argument through).
    ``out_specs``: a spec or a pytree of specs matching ``f``'s output. An out-spec may carry
    ``unreduced=`` axes when ``f`` returns partial sums.
    """
    def wrapped(*args):
        if len(args) != len(in_specs):
            raise ShardingError(f"shard_map: {len(args)} arguments but {len(in_specs)} in_specs")
        locs = []
        for i, (a, s) in enumerate(zip(args, in_specs)):
            if s is None or not isinstance(a, torch.Tensor):
                locs.append(a)
                continue
            s = _as_spec(s)
            st = reshard(a, s) if isinstance(a, ShardedTensor) else shard(a, s, mesh)
            if st.mesh != mesh:
                raise ShardingError(f"shard_map argument {i} lives on {st.mesh}, not {mesh}")
            locs.append(enter(st))
        out = f(*locs)
        flat_out, tree = tree_flatten(out)
        if isinstance(out_specs, P):
            flat_specs = [out_specs] * len(flat_out)
        else:
            flat_specs, _ = tree_flatten(out_specs, is_leaf=lambda x: isinstance(x, P))
        if len(flat_specs) != len(flat_out):
            raise ShardingError(f"shard_map: f returned {len(flat_out)} tensors but out_specs has {len(flat_specs)}")
        wrapped_out = [from_local(o, s, mesh) if isinstance(o, torch.Tensor) else o
                       for o, s in zip(flat_out, flat_specs)]
        return tree_unflatten(wrapped_out, tree)
    return wrapped
