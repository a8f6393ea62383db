"""JAX-style collectives by axis name alone, for use inside :func:`~meshpar.shard_map`.

Inside ``shard_map(f, mesh, in_specs, out_specs)``, ``f`` sees plain local blocks and may call::

    psum(x, "y")                      # all-reduce over y            (partial -> replicated)
    pmean(x, "y"), pmax(x, "y"), pmin(x, "y")
    all_gather(x, "y", dim=0)         # stack the members' blocks on a new dim 0 (JAX tiled=False)
    all_gather(x, "y", dim=0, tiled=True)   # concatenate them along dim 0
    psum_scatter(x, "y", dim=0, tiled=True) # reduce-scatter: sum, keep this member's chunk of dim 0
    ppermute(x, "x", perm=[(0, 1), (1, 0)])  # send block of member s to member d
    all_to_all(x, "x", split_dim=1, concat_dim=0)
    pvary(x, "x")                     # identity; backward sums the gradient over x
    axis_index("x"), axis_size("x")   # this rank's index along x, the size of x

The mesh comes from the enclosing ``shard_map`` through a context variable (set for the duration
of ``f``'s call, so nested and concurrent calls see their own mesh; nothing is global). Outside a
``shard_map`` pass the mesh explicitly, either as the second positional argument (the form of
:mod:`meshpar.mesh.autograd`: ``psum(x, mesh, "y")``) or as ``mesh=``; calling one without a mesh
outside ``shard_map`` raises a :class:`~meshpar.ShardingError` saying so.

``axes`` is one axis name or a tuple of names (taken major to minor). Every function is
autograd-aware; the backward of each is its dual (see :mod:`meshpar.mesh.autograd`, which this
module calls: there is no second copy of any collective).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Sequence

import torch

from ..errors import ShardingError
from ..mesh import Mesh
from ..mesh import autograd as A

_SHARD_MAP_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("meshpar_shard_map_mesh", default=None)


@contextlib.contextmanager
def inside_shard_map(mesh: Mesh) -> Iterator[Mesh]:
    """Make ``mesh`` the mesh of the by-name collectives for the duration of the block."""
    tok = _SHARD_MAP_MESH.set(mesh)
    try:
        yield mesh
    finally:
        _SHARD_MAP_MESH.reset(tok)


def shard_map_mesh() -> Mesh | None:
    """The mesh of the innermost enclosing ``shard_map``, or None outside one."""
    return _SHARD_MAP_MESH.get()


def _resolve(fn: str, axes, rest: tuple, mesh: Mesh | None) -> tuple[Mesh, tuple[str, ...], tuple]:
    """Split ``(axes, *rest)`` into (mesh, axes, rest), accepting the explicit form ``(mesh, axes, *rest)``."""
    if isinstance(axes, Mesh):
        if mesh is not None:
            raise TypeError(f"{fn}: the mesh was given twice (positionally and as mesh=)")
        if not rest:
            raise TypeError(f"{fn}(x, mesh, axes, ...): the axis names are missing")
        mesh, axes, rest = axes, rest[0], rest[1:]
    if mesh is None:
        mesh = _SHARD_MAP_MESH.get()
        if mesh is None:
            raise ShardingError(
                f"{fn}(..., {axes!r}) names mesh axes but no mesh is known: call it inside a function run by "
                f"meshpar.shard_map(f, mesh, in_specs, out_specs), or pass the mesh explicitly "
                f"({fn}(x, mesh, {axes!r}, ...) or mesh=mesh)")
    try:
        axes_t = mesh.check_axes(axes)
    except ShardingError as e:
        raise ShardingError(f"{fn}: {e} (the axes of {mesh} are {mesh.names})") from e
    return mesh, axes_t, rest


def _one(fn: str, rest: tuple, name: str, given, default):
    """A parameter that may come positionally (after the axes) or by keyword."""
    if rest:
        if given is not None:
            raise TypeError(f"{fn}: {name} given twice")
        return rest[0], rest[1:]
    return (default if given is None else given), rest


def _no_more(fn: str, rest: tuple) -> None:
    if rest:
        raise TypeError(f"{fn}: unexpected extra positional arguments {rest!r}")


def psum(x: torch.Tensor, axes, *rest, mesh: Mesh | None = None) -> torch.Tensor:
    """Sum of ``x`` over the members of ``axes`` (partial -> replicated). Backward: identity."""
    mesh, axes, rest = _resolve("psum", axes, rest, mesh)
    _no_more("psum", rest)
    return A.psum(x, mesh, axes)


def pmean(x: torch.Tensor, axes, *rest, mesh: Mesh | None = None) -> torch.Tensor:
    """Mean of ``x`` over the members of ``axes``."""
    mesh, axes, rest = _resolve("pmean", axes, rest, mesh)
    _no_more("pmean", rest)
    return A.pmean(x, mesh, axes)


def pmax(x: torch.Tensor, axes, *rest, mesh: Mesh | None = None) -> torch.Tensor:
    """Elementwise max over ``axes`` (not differentiable: the result is detached)."""
    mesh, axes, rest = _resolve("pmax", axes, rest, mesh)
    _no_more("pmax", rest)
    return A.pmax(x, mesh, axes)


def pmin(x: torch.Tensor, axes, *rest, mesh: Mesh | None = None) -> torch.Tensor:
    """Elementwise min over ``axes`` (not differentiable: the result is detached)."""
    mesh, axes, rest = _resolve("pmin", axes, rest, mesh)
    _no_more("pmin", rest)
    return A.pmin(x, mesh, axes)


def pvary(x: torch.Tensor, axes, *rest, mesh: Mesh | None = None) -> torch.Tensor:
    """Identity; backward sums the gradient over ``axes``. Use it on a replicated value that feeds a
    per-rank (sharded or partial) computation, so its gradient is the sum of the ranks' shares."""
    mesh, axes, rest = _resolve("pvary", axes, rest, mesh)
    _no_more("pvary", rest)
    return A.pvary(x, mesh, axes)


def all_gather(x: torch.Tensor, axes, *rest, dim: int | None = None, tiled: bool = False,
               mesh: Mesh | None = None) -> torch.Tensor:
    """Gather the members' blocks of ``x`` (``[*s]``), ordered major to minor over ``axes``.

    ``tiled=False`` (JAX's default): stack them on a new dimension ``dim`` (result
    ``[*s[:dim], n, *s[dim:]]``). ``tiled=True``: concatenate along ``dim`` (result ``s[dim] * n``).
    Backward: each member keeps the gradient of its own block (the result is replicated over ``axes``).
    """
    mesh, axes, rest = _resolve("all_gather", axes, rest, mesh)
    dim, rest = _one("all_gather", rest, "dim", dim, 0)
    _no_more("all_gather", rest)
    if tiled:
        return A.all_gather(x, mesh, axes, dim)
    d = dim % (x.ndim + 1)
    return A.all_gather(x.unsqueeze(d), mesh, axes, d)


def psum_scatter(x: torch.Tensor, axes, *rest, dim: int | None = None, tiled: bool = False,
                 mesh: Mesh | None = None) -> torch.Tensor:
    """Sum ``x`` over ``axes`` and keep this member's part of dimension ``dim`` (reduce-scatter).

    ``tiled=True``: ``dim`` (size a multiple of n) is cut into n chunks, member i keeps chunk i.
    ``tiled=False`` (JAX's default): ``dim`` must have size exactly n and is removed; member i keeps
    index i. Backward: all-gather (the transpose of :func:`all_gather` with the same ``tiled``).
    """
    mesh, axes, rest = _resolve("psum_scatter", axes, rest, mesh)
    dim, rest = _one("psum_scatter", rest, "dim", dim, 0)
    _no_more("psum_scatter", rest)
    if tiled:
        return A.psum_scatter(x, mesh, axes, dim)
    n = mesh.size(axes)
    d = dim % x.ndim
    if x.shape[d] != n:
        raise ShardingError(f"psum_scatter(x, {axes}, dim={dim}, tiled=False): dim {d} has size {x.shape[d]} but "
                            f"the axis size is {n}; untiled scatter removes a dim of size exactly {n}. "
                            f"Pass tiled=True to scatter chunks of a longer dim")
    return A.psum_scatter(x, mesh, axes, d).squeeze(d)


def all_to_all(x: torch.Tensor, axes, *rest, split_dim: int | None = None, concat_dim: int | None = None,
               mesh: Mesh | None = None) -> torch.Tensor:
    """Cut ``split_dim`` into n chunks, send chunk i to member i, concatenate what arrives along
    ``concat_dim`` (ordered by sender). This is JAX's ``all_to_all(..., tiled=True)``.
    Backward: the inverse all-to-all."""
    mesh, axes, rest = _resolve("all_to_all", axes, rest, mesh)
    split_dim, rest = _one("all_to_all", rest, "split_dim", split_dim, None)
    concat_dim, rest = _one("all_to_all", rest, "concat_dim", concat_dim, None)
    _no_more("all_to_all", rest)
    if split_dim is None or concat_dim is None:
        raise TypeError("all_to_all(x, axes, split_dim, concat_dim): split_dim and concat_dim are required")
    return A.all_to_all(x, mesh, axes, split_dim, concat_dim)


def ppermute(x: torch.Tensor, axes, *rest, perm: Sequence[tuple[int, int]] | None = None,
             mesh: Mesh | None = None) -> torch.Tensor:
    """Send ``x`` from member ``s`` to member ``d`` of ``axes`` for each ``(s, d)`` in ``perm``; a member
    that receives nothing gets zeros. Backward: the inverse permutation."""
    mesh, axes, rest = _resolve("ppermute", axes, rest, mesh)
    perm, rest = _one("ppermute", rest, "perm", perm, None)
    _no_more("ppermute", rest)
    if perm is None:
        raise TypeError("ppermute(x, axes, perm): perm, a list of (source, destination) pairs, is required")
    n = mesh.size(axes)
    for s, d in perm:
        if not (0 <= s < n and 0 <= d < n):
            raise ShardingError(f"ppermute over {axes} (size {n}): pair {(s, d)} is out of range 0..{n - 1}")
    return A.ppermute(x, mesh, axes, perm)


def axis_index(axes, *rest, mesh: Mesh | None = None) -> int:
    """This rank's index along ``axes`` (a tuple is taken major to minor)."""
    mesh, axes, rest = _resolve("axis_index", axes, rest, mesh)
    _no_more("axis_index", rest)
    return mesh.axis_index(axes)


def axis_size(axes, *rest, mesh: Mesh | None = None) -> int:
    """The number of members of ``axes`` (the product of their sizes)."""
    mesh, axes, rest = _resolve("axis_size", axes, rest, mesh)
    _no_more("axis_size", rest)
    return mesh.size(axes)


__all__ = ["psum", "pmean", "pmax", "pmin", "pvary", "all_gather", "psum_scatter", "all_to_all", "ppermute",
           "axis_index", "axis_size", "inside_shard_map", "shard_map_mesh"]
