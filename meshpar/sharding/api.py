"""The user-facing layout functions: shard, from_local, unshard, reshard."""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import ShardingError
from ..mesh import Mesh, current_mesh
from .core import enter, slice_block, wrap
from .semantics import debug_enabled
from .layout import local_shape, take_block, validate
from .reshard import plan, run_steps
from .spec import P
from .tensor import ShardedTensor


def check_replicated(block: torch.Tensor, spec: P, mesh: Mesh, what: str) -> None:
    """Debug mode: raise when ranks disagree on a block that ``spec`` says is replicated.

    One small all-reduce (max and -min of a 3-number checksum) over the mesh axes ``spec`` does
    not use; the block's values are not moved."""
    rep = tuple(a for a in mesh.names if a not in spec.used_axes() and mesh.size(a) > 1)
    if not rep:
        return
    from ..mesh import collectives as C
    with torch.no_grad():
        b = block.detach().reshape(-1).to(torch.float64)
        w = torch.arange(1, b.numel() + 1, dtype=torch.float64, device=b.device).remainder_(97.0).add_(1.0)
        cs = torch.stack([b.nan_to_num(0.0).sum(), (b.nan_to_num(0.0) * w).sum(), b.isnan().sum().to(torch.float64)])
        both = torch.cat([cs, -cs])
        red = C.all_reduce(both, mesh, rep, op="max")
    hi, lo = red[:3], -red[3:]
    tol = 1e-6 * float(cs.abs().max().cpu()) + 1e-12 if block.dtype.is_floating_point else 0.0
    if bool(((hi - lo).abs() > tol).any()):
        raise ShardingError(
            f"{what}: the block differs across ranks of mesh axes {rep}, but spec {spec} says it is replicated "
            f"over them (debug check; checksums {hi.tolist()} vs {lo.tolist()}). Give every rank the same value "
            f"(e.g. the same seed or a broadcast), or name the axes in the spec (e.g. a batch dim split over "
            f"{rep[0]!r}), or use an unreduced spec for partial sums")


def _as_spec(spec) -> P:
    if isinstance(spec, P):
        return spec
    if isinstance(spec, (tuple, list)):
        return P(*spec)
    if spec is None:
        return P()
    raise ShardingError(f"expected a partition spec P(...), got {spec!r}")


def shard(x: torch.Tensor, spec: P, mesh: Mesh | None = None) -> ShardedTensor:
    """Lay out the global tensor ``x`` by ``spec``: every rank keeps its block.

    No communication when every rank holds the same ``x``. A ShardedTensor input is resharded.
    Gradients flow back to ``x`` (as the full gradient on every rank). A :class:`~meshpar.Zigzag`
    dim is cut into ``2n`` chunks and each rank keeps its two (``x`` stays in natural order).
    """
    spec = _as_spec(spec)
    if isinstance(x, ShardedTensor):
        return reshard(x, spec)
    mesh = current_mesh(mesh)
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    validate(x.shape, spec, mesh, "shard")
    if spec.unreduced:
        raise ShardingError("shard() takes a global value; an unreduced spec is not a layout of one "
                            "(use from_local for partial sums)")
    if torch.is_grad_enabled() and x.requires_grad:
        loc = x
        for d in range(x.ndim):
            loc = slice_block(loc, mesh, spec.axes_of(d), d)
        if debug_enabled():
            check_replicated(loc, spec, mesh, "shard")
        return wrap(loc, spec, mesh, x.shape)
    loc = take_block(x, spec, mesh)
    if (loc._is_view() and loc.numel() != x.numel()) or not loc.is_contiguous():
        loc = loc.clone(memory_format=torch.contiguous_format)
    if debug_enabled():
        check_replicated(loc, spec, mesh, "shard")
    return ShardedTensor(loc, spec, mesh, x.shape)


def from_local(block: torch.Tensor, spec: P, mesh: Mesh | None = None,
               shape: Sequence[int] | None = None) -> ShardedTensor:
    """View this rank's ``block`` as part of a global tensor laid out by ``spec``.

    The global shape is ``block.shape`` times the axis sizes unless ``shape`` is given. Along a
    :class:`~meshpar.Zigzag` dim the block must already be in that layout (chunk ``r``, then
    chunk ``2n-1-r``).
    """
    spec = _as_spec(spec)
    mesh = current_mesh(mesh)
    if len(spec) > block.ndim:
        raise ShardingError(f"from_local: spec {spec} has more entries than the block has dims ({block.ndim})")
    gshape = tuple(s * (mesh.size(spec.axes_of(d)) if spec.axes_of(d) else 1) for d, s in enumerate(block.shape))
    if shape is not None:
        if tuple(local_shape(shape, spec, mesh)) != tuple(block.shape):
            raise ShardingError(f"from_local: block shape {tuple(block.shape)} is not the block of global shape "
                                f"{tuple(shape)} under {spec} (expected {local_shape(shape, spec, mesh)})")
        gshape = tuple(shape)
    validate(gshape, spec, mesh, "from_local")
    if debug_enabled():
        check_replicated(block, spec, mesh, "from_local")
    return wrap(block, spec, mesh, gshape)


def reshard(x: ShardedTensor, spec: P) -> ShardedTensor:
    """Change ``x``'s layout to ``spec`` with the cheapest collectives (see :mod:`.reshard`).

    Zigzag <-> contiguous/replicated on one dim costs one all-gather plus local reorders."""
    spec = _as_spec(spec)
    if not isinstance(x, ShardedTensor):
        return shard(x, spec)
    validate(x._gshape, spec, x.mesh, "reshard")
    if spec == x.spec:
        return x
    steps = plan(x.spec, spec, len(x._gshape))
    loc = run_steps(enter(x), steps, x.mesh, differentiable=True)
    return wrap(loc, spec, x.mesh, x._gshape)


def unshard(x) -> torch.Tensor:
    """The global tensor, on every rank (a plain tensor in natural order, connected to autograd)."""
    if not isinstance(x, ShardedTensor):
        return x
    return enter(reshard(x, P()))
