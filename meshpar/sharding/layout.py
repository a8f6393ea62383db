"""Layout math: everything derived from (global shape, spec, mesh).

A dimension of size ``n`` split over axes ``(a, b)`` of sizes ``sa, sb`` is cut into ``sa*sb``
equal blocks; the rank with coordinates ``(ca, cb)`` holds block ``ca*sb + cb``.

A dimension split over ``Zigzag(a)`` (``sa`` ranks) is cut into ``2*sa`` chunks and rank ``ca``
holds chunks ``ca`` and ``2*sa-1-ca`` (:mod:`.zigzag`). Its block has the same size as a
contiguous one but is not one slice: :func:`block_offsets`/:func:`block_slices` refuse such a
dim; :func:`block_positions` and :func:`take_block` handle every layout.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import ShardingError
from ..mesh import Mesh
from . import zigzag as Z
from .spec import P, base_axis, is_zigzag


def validate(shape: Sequence[int], spec: P, mesh: Mesh, what: str = "tensor") -> None:
    """Raise a ShardingError naming the dimension, the axis and the fix when ``spec`` can't lay out ``shape``."""
    ndim = len(shape)
    if len(spec) > ndim:
        raise ShardingError(
            f"{what}: spec {spec} has {len(spec)} entries but the tensor has {ndim} dims {tuple(shape)}; "
            f"drop the extra entries")
    seen: dict[str, str] = {}
    for d in range(len(spec)):
        for a in map(base_axis, spec.axes_of(d)):
            if a not in mesh.names:
                raise ShardingError(f"{what}: dim {d} names unknown mesh axis {a!r}; {mesh} has axes {mesh.names}")
            if a in seen:
                raise ShardingError(f"{what}: mesh axis {a!r} is used twice in spec {spec} ({seen[a]} and dim {d}); "
                                    "an axis may split only one dimension once")
            seen[a] = f"dim {d}"
    for a in spec.unreduced:
        if a not in mesh.names:
            raise ShardingError(f"{what}: unreduced axis {a!r} is not in {mesh}")
        if a in seen:
            raise ShardingError(f"{what}: axis {a!r} is both unreduced and splitting {seen[a]} in {spec}")
    for d in range(len(spec)):
        axes = spec.axes_of(d)
        if not axes:
            continue
        n = mesh.size(axes)
        if is_zigzag(axes) and n > 1 and shape[d] % (2 * n) != 0:
            raise ShardingError(
                f"{what}: dim {d} has size {shape[d]}, but the zigzag layout over mesh axis {base_axis(axes[0])!r} "
                f"({n} ranks) cuts it into 2*{n} = {2 * n} equal chunks; pad dim {d} to a multiple of {2 * n} "
                f"(e.g. meshpar.ops.attention.pad_to_multiple), or use the contiguous spec {spec.contiguous()}")
        if shape[d] % n != 0:
            raise ShardingError(
                f"{what}: dim {d} has size {shape[d]}, not divisible by mesh axes {axes} of size {n}; "
                f"pad dim {d} to a multiple of {n}, or shard it over fewer axes")


def local_shape(shape: Sequence[int], spec: P, mesh: Mesh) -> tuple[int, ...]:
    """Shape of each rank's block."""
    return tuple(s // mesh.size(spec.axes_of(d)) if spec.axes_of(d) else s for d, s in enumerate(shape))


def _zigzag_split(spec: P, mesh: Mesh, dim: int) -> bool:
    axes = spec.axes_of(dim)
    return is_zigzag(axes) and mesh.size(axes) > 1


def block_index(spec: P, mesh: Mesh, dim: int) -> int:
    """Which block of ``dim`` this rank holds (for a zigzag dim: the rank's index along its axis)."""
    axes = spec.axes_of(dim)
    return mesh.axis_index(axes) if axes else 0


def block_offset(shape: Sequence[int], spec: P, mesh: Mesh, dim: int) -> int:
    """Global index of the first row of this rank's block along ``dim`` (a contiguous or whole dim)."""
    dim = dim % len(shape)
    if _zigzag_split(spec, mesh, dim):
        raise ShardingError(
            f"dim {dim} of {spec} is in the zigzag layout over {base_axis(spec.axes_of(dim)[0])!r}: this rank "
            f"holds two chunks, not one block with an offset. Use block_positions(shape, spec, mesh, {dim}) "
            f"for its global positions, or reshard to the contiguous spec {spec.contiguous()}")
    return block_index(spec, mesh, dim) * local_shape(shape, spec, mesh)[dim]


def block_offsets(shape: Sequence[int], spec: P, mesh: Mesh) -> tuple[int, ...]:
    """Global index of this rank's block start, per dimension (ShardingError for a zigzag dim)."""
    return tuple(block_offset(shape, spec, mesh, d) for d in range(len(shape)))


def block_slices(shape: Sequence[int], spec: P, mesh: Mesh) -> tuple[slice, ...]:
    """Slices of the global tensor that make up this rank's block (ShardingError for a zigzag dim;
    :func:`take_block` handles every layout)."""
    loc = local_shape(shape, spec, mesh)
    off = block_offsets(shape, spec, mesh)
    return tuple(slice(o, o + n) for o, n in zip(off, loc))


def block_positions(shape: Sequence[int], spec: P, mesh: Mesh, dim: int, device=None) -> torch.Tensor:
    """Global positions (int64, ascending within each chunk) of this rank's rows along ``dim``.

    Contiguous: ``[off, off + n)``; zigzag: chunk ``r`` then chunk ``2k-1-r`` (``k`` ranks). For
    position embeddings (rotary, learned) and position-dependent masks of a split sequence.
    """
    dim = dim % len(shape)
    if _zigzag_split(spec, mesh, dim):
        axes = spec.axes_of(dim)
        return Z.local_positions(shape[dim], mesh.size(axes), mesh.axis_index(axes), device)
    off = block_offset(shape, spec, mesh, dim)
    return torch.arange(off, off + local_shape(shape, spec, mesh)[dim], device=device)


def take_block(x: torch.Tensor, spec: P, mesh: Mesh) -> torch.Tensor:
    """This rank's block of the global tensor ``x`` under ``spec`` (views where the layout allows)."""
    shape = tuple(x.shape)
    loc = local_shape(shape, spec, mesh)
    out = x
    for d in range(len(shape)):
        axes = spec.axes_of(d)
        if not axes or loc[d] == shape[d]:
            continue
        if is_zigzag(axes):
            out = Z.take_local(out, mesh.size(axes), mesh.axis_index(axes), d)
        else:
            out = out.narrow(d, mesh.axis_index(axes) * loc[d], loc[d])
    return out
