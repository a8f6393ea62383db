"""Layout math: everything derived from (global shape, spec, mesh).

A dimension of size ``n`` split over axes ``(a, b)`` of sizes ``sa, sb`` is cut into ``sa*sb``
equal blocks; the rank with coordinates ``(ca, cb)`` holds block ``ca*sb + cb``.
"""
from __future__ import annotations

from typing import Sequence

from ..errors import ShardingError
from ..mesh import Mesh
from .spec import P


def validate(shape: Sequence[int], spec: P, mesh: Mesh, what: str = "tensor") -> None:
    """Raise a ShardingError naming the dimension, the axis and the fix when ``spec`` can't lay out ``shape``."""
    ndim = len(shape)
    if len(spec) > ndim:
        raise ShardingError(
            f"{what}: spec {spec} has {len(spec)} entries but the tensor has {ndim} dims {tuple(shape)}; "
            f"drop the extra entries")
    seen: dict[str, str] = {}
    for d in range(len(spec)):
        for a in spec.axes_of(d):
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
        if shape[d] % n != 0:
            raise ShardingError(
                f"{what}: dim {d} has size {shape[d]}, not divisible by mesh axes {axes} of size {n}; "
                f"pad dim {d} to a multiple of {n}, or shard it over fewer axes")


def local_shape(shape: Sequence[int], spec: P, mesh: Mesh) -> tuple[int, ...]:
    """Shape of each rank's block."""
    return tuple(s // mesh.size(spec.axes_of(d)) if spec.axes_of(d) else s for d, s in enumerate(shape))


def block_index(spec: P, mesh: Mesh, dim: int) -> int:
    """Which block of ``dim`` this rank holds."""
    axes = spec.axes_of(dim)
    return mesh.axis_index(axes) if axes else 0


def block_offsets(shape: Sequence[int], spec: P, mesh: Mesh) -> tuple[int, ...]:
    """Global index of this rank's block start, per dimension."""
    loc = local_shape(shape, spec, mesh)
    return tuple(block_index(spec, mesh, d) * loc[d] for d in range(len(shape)))


def block_slices(shape: Sequence[int], spec: P, mesh: Mesh) -> tuple[slice, ...]:
    """Slices of the global tensor that make up this rank's block."""
    loc = local_shape(shape, spec, mesh)
    off = block_offsets(shape, spec, mesh)
    return tuple(slice(o, o + n) for o, n in zip(off, loc))
