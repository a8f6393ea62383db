"""shard_map: run a function on local blocks, with collectives by axis name inside.

``shard_map(f, mesh, in_specs, out_specs)(*args)``: each argument is brought to its in-spec
(``shard`` for plain tensors, ``reshard`` for ShardedTensors), ``f`` is called with the plain
local blocks (connected to autograd), and each output block is wrapped with its out-spec.

Inside ``f`` the collectives of :mod:`meshpar.sharding.collectives_by_name` take axis names alone
(``psum(x, "y")``, ``all_gather(x, "y", dim=0)``, ``ppermute(x, "x", perm)``, ``axis_index("x")``):
the mesh is the enclosing ``shard_map``'s, carried by a context variable for the call.

Replication check (JAX's ``check_rep``): an output whose out-spec leaves a mesh axis out (neither
splits a dim over it nor lists it in ``unreduced=``) claims that every member of that axis holds the
same block. By default this is verified after ``f`` returns: each output's block is reduced to three
float64 checksums, one all-gather over the whole mesh brings everyone's checksums to every rank,
and every rank checks every replica group, so all ranks agree on the outcome (no rank raises while
another goes on into a collective). A mismatch raises a :class:`~meshpar.ShardingError` naming the
output and the axes. ``check_rep=False`` skips it (one all-gather of ``24·outputs`` bytes per rank).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten, keystr, tree_flatten_with_path

from ..errors import ShardingError
from ..mesh import Mesh
from ..mesh import collectives as C
from .api import _as_spec, from_local, reshard, shard
from .collectives_by_name import inside_shard_map
from .core import enter
from .spec import P
from .tensor import ShardedTensor


def shard_map(f: Callable, mesh: Mesh, in_specs: Sequence[P | None], out_specs: Any, *,
              check_rep: bool = True) -> Callable:
    """Wrap ``f`` (a function of local blocks) into a function of global/sharded tensors.

    ``in_specs``: one spec per positional argument (``None`` passes a non-tensor argument through).
    ``out_specs``: a spec or a pytree of specs matching ``f``'s output. An out-spec may carry
    ``unreduced=`` axes when ``f`` returns partial sums.
    ``check_rep``: verify that outputs are equal across the mesh axes their out-spec leaves out
    (see the module docstring); raises a ShardingError naming the output and the axes otherwise.
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
        with inside_shard_map(mesh):
            out = f(*locs)
        path_leaves, _ = tree_flatten_with_path(out)
        flat_out, tree = tree_flatten(out)
        if isinstance(out_specs, P):
            flat_specs = [out_specs] * len(flat_out)
        else:
            flat_specs, _ = tree_flatten(out_specs, is_leaf=lambda x: isinstance(x, P))
        if len(flat_specs) != len(flat_out):
            raise ShardingError(f"shard_map: f returned {len(flat_out)} tensors but out_specs has {len(flat_specs)}")
        flat_specs = [_as_spec(s) for s in flat_specs]
        if check_rep:
            names = [f"output{keystr(p)}" if keystr(p) else "output" for p, _ in path_leaves]
            check_replicated(flat_out, flat_specs, mesh, names)
        wrapped_out = [from_local(o, s, mesh) if isinstance(o, torch.Tensor) else o
                       for o, s in zip(flat_out, flat_specs)]
        return tree_unflatten(wrapped_out, tree)
    return wrapped


def _checksums(t: torch.Tensor) -> torch.Tensor:
    """Three float64 numbers that differ between blocks that differ (in practice): the sum, a
    position-weighted sum and the sum of squares of the block."""
    x = t.detach()
    if x.is_complex():
        x = torch.view_as_real(x)
    x = x.reshape(-1).to(torch.float64)
    x = torch.nan_to_num(x, nan=1.2345, posinf=1e300, neginf=-1e300)
    if x.numel() == 0:
        return torch.zeros(3, dtype=torch.float64, device=x.device)
    w = torch.linspace(1.0, 2.0, x.numel(), dtype=torch.float64, device=x.device)
    return torch.stack([x.sum(), (x * w).sum(), (x * x).sum()])


def check_replicated(outs: Sequence[Any], specs: Sequence[P], mesh: Mesh, names: Sequence[str]) -> None:
    """Raise a ShardingError when an output's blocks differ across an axis its spec says is replicated.

    One all-gather over the whole mesh (``3`` float64 per output per rank); every rank then decides
    for every replica group, so all ranks raise or none does.
    """
    todo = []
    for i, (o, s) in enumerate(zip(outs, specs)):
        if not isinstance(o, torch.Tensor):
            continue
        rep = [a for a in mesh.names if a not in s.used_axes() and mesh.size(a) > 1]
        if rep:
            todo.append((i, rep))
    if not todo:
        return
    local = torch.stack([_checksums(outs[i]) for i, _ in todo])          # [k, 3]
    with torch.no_grad():
        every = C.all_gather(local.unsqueeze(0), mesh, mesh.names, 0)    # [ranks, k, 3], mesh rank order
    every = every.reshape(*mesh.shape, len(todo), 3).cpu()
    problems = []
    for j, (i, rep) in enumerate(todo):
        vals = every[..., j, :]
        bad = []
        for a in rep:
            d = mesh.names.index(a)
            ref = vals.select(d, 0).unsqueeze(d)
            tol = 1e-12 * (1.0 + ref.abs())
            if ((vals - ref).abs() > tol).any():
                bad.append(a)
        if bad:
            problems.append(f"{names[i]} (out_spec {specs[i]}) differs across mesh axes {tuple(bad)}")
    if problems:
        raise ShardingError(
            "shard_map: " + "; ".join(problems) + ". An out-spec that leaves an axis out says every member of "
            "that axis holds the same block. Make the value replicated (e.g. psum(x, axis) for a partial "
            "sum), name the axis in the out-spec (a split dim, or unreduced=(axis,) for a partial sum), "
            "or pass check_rep=False to skip this check")
