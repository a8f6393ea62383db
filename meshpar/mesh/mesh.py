"""The device mesh: named axes over the ranks of a torch.distributed world.

A :class:`Mesh` is a value. ``Mesh((2, 2), ("x", "y"))`` spans world ranks ``0..3`` in
row-major order (the last axis varies fastest). Building one is collective: every rank of
the world must build the same mesh in the same order, because process groups are created
for every subset of axes. Ranks of the world outside the mesh get a mesh object whose
``contains_me`` is False.
"""
from __future__ import annotations

import contextvars
import itertools
import math
from datetime import timedelta
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

from ..errors import ShardingError

Axes = tuple[str, ...]
_DEFAULT_MESH: contextvars.ContextVar["Mesh | None"] = contextvars.ContextVar("meshpar_default_mesh", default=None)


def normalize_axes(axes: str | Sequence[str] | None) -> Axes:
    """``"x"`` -> ``("x",)``; ``("x","y")`` stays; ``None`` -> ``()``.

    Layout-tagged names (``meshpar.Zigzag("x")``, a ``str`` subclass) become plain names: a
    collective over an axis does not depend on how a tensor is laid out along it.
    """
    if axes is None:
        return ()
    if isinstance(axes, str):
        return (axes if type(axes) is str else str.__str__(axes),)
    t = tuple(axes)
    for a in t:
        if type(a) is not str:
            return tuple(str.__str__(a) if isinstance(a, str) else a for a in t)
    return t


#: process groups by (world, ranks, timeout), shared by every mesh of one world: each gloo group holds
#: threads and connections, and meshes over the same ranks (e.g. ("x", "y") and ("data", "tp") on 2x2)
#: need the same groups. Every rank builds the same meshes in the same order (torch requires it of
#: ``new_group``), so every rank's cache has the same entries and they all skip the same calls.
#: The value keeps the world group alive so its id is never reused by a later world.
_GROUPS: dict[tuple, tuple] = {}


def _shared_group(ranks: list[int], timeout: timedelta) -> dist.ProcessGroup:
    world = dist.group.WORLD
    key = (id(world), tuple(ranks), timeout)
    hit = _GROUPS.get(key)
    if hit is None:
        hit = _GROUPS[key] = (world, dist.new_group(ranks, timeout=timeout))
    return hit[1]


class Mesh:
    """An n-dimensional grid of ranks with named axes.

    Args:
        shape: size of each axis, e.g. ``(2, 2)``.
        names: one unique name per axis, e.g. ``("x", "y")``.
        timeout_s: timeout of every collective on this mesh's groups. A collective that
            runs past it raises :class:`~meshpar.errors.CollectiveTimeout` naming the op and axis.

    The process group for any axis or tuple of axes is available through :meth:`group`.
    Ranks inside a group are ordered row-major over the mesh axes (mesh order).
    """

    def __init__(self, shape: Sequence[int], names: Sequence[str], *, timeout_s: float = 300.0):
        shape = tuple(int(s) for s in shape)
        names = tuple(names)
        _validate_shape_names(shape, names)
        if not dist.is_available() or not dist.is_initialized():
            raise ShardingError(
                "Mesh needs an initialized torch.distributed world: call meshpar.launch(...), "
                "meshpar.launch_from_torch(...) or torch.distributed.init_process_group(...) first."
            )
        world = dist.get_world_size()
        size = math.prod(shape)
        if size > world:
            raise ShardingError(
                f"mesh {dict(zip(names, shape))} needs {size} ranks but the world has {world}; "
                f"shrink an axis or launch {size} processes (torchrun --nproc-per-node {size})."
            )
        self._size_cache: dict = {}
        self._index_cache: dict = {}
        self._layouts: dict = {}  # (spec, global shape) -> interned sharding.tensor.Layout (bounded there)
        self.shape: tuple[int, ...] = shape
        self.names: Axes = names
        self._hash = hash((shape, names))
        self.timeout_s = float(timeout_s)
        self.world_rank: int = dist.get_rank()
        self.contains_me: bool = self.world_rank < size
        self.backend: str = dist.get_backend()
        self._coords: tuple[int, ...] | None = (
            tuple(int(c) for c in _unravel(self.world_rank, shape)) if self.contains_me else None
        )
        self._groups: dict[frozenset[str], dist.ProcessGroup | None] = {}
        self._build_groups()

    # ----------------------------------------------------------------- construction
    def _build_groups(self) -> None:
        """Create one group per (subset of axes, fixed coordinates of the other axes).

        Every world rank calls ``new_group`` for every group in the same order, as
        torch.distributed requires. Subsets whose size is 1 need no group.
        """
        timeout = timedelta(seconds=self.timeout_s)
        n = len(self.shape)
        for k in range(1, n + 1):
            for subset in itertools.combinations(range(n), k):
                key = frozenset(self.names[i] for i in subset)
                if math.prod(self.shape[i] for i in subset) == 1:
                    self._groups[key] = None
                    continue
                others = [i for i in range(n) if i not in subset]
                mine = None
                for fixed in itertools.product(*(range(self.shape[i]) for i in others)):
                    ranks = []
                    for var in itertools.product(*(range(self.shape[i]) for i in subset)):
                        coord = [0] * n
                        for i, c in zip(others, fixed):
                            coord[i] = c
                        for i, c in zip(subset, var):
                            coord[i] = c
                        ranks.append(_ravel(coord, self.shape))
                    if len(ranks) == dist.get_world_size():
                        g = dist.group.WORLD
                    else:
                        g = _shared_group(ranks, timeout)
                    if self.contains_me and self.world_rank in ranks:
                        mine = g
                self._groups[key] = mine

    # ----------------------------------------------------------------- queries
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def device(self) -> torch.device:
        """``cuda:<local>`` on NCCL, else ``cpu``."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def check_axes(self, axes: str | Sequence[str]) -> Axes:
        """Normalize ``axes`` and raise a ShardingError for unknown or repeated names."""
        axes = normalize_axes(axes)
        for a in axes:
            if a not in self.names:
                raise ShardingError(f"unknown mesh axis {a!r}; this mesh has axes {self.names}")
        if len(set(axes)) != len(axes):
            raise ShardingError(f"axis repeated in {axes}; each mesh axis may appear once")
        return axes

    def size(self, axes: str | Sequence[str] | None = None) -> int:
        """Number of ranks along ``axes`` (all axes when None)."""
        key = axes if isinstance(axes, (str, tuple)) or axes is None else tuple(axes)
        n = self._size_cache.get(key)
        if n is None:
            if axes is None:
                n = math.prod(self.shape)
            else:
                n = math.prod(self.shape[self.names.index(a)] for a in self.check_axes(axes))
            self._size_cache[key] = n
        return n

    def coord(self, axis: str) -> int:
        """This rank's coordinate along ``axis``."""
        (axis,) = self.check_axes(axis)
        if self._coords is None:
            raise ShardingError(f"world rank {self.world_rank} is not part of mesh {self}")
        return self._coords[self.names.index(axis)]

    @property
    def coords(self) -> dict[str, int]:
        return {a: self.coord(a) for a in self.names}

    @property
    def rank(self) -> int:
        """This rank's linear index inside the mesh (row-major)."""
        return self.axis_index(self.names)

    def axis_index(self, axes: str | Sequence[str]) -> int:
        """Linear index of this rank along ``axes`` taken major to minor in the given order."""
        key = axes if isinstance(axes, (str, tuple)) else tuple(axes)
        idx = self._index_cache.get(key)
        if idx is None:
            idx = 0
            for a in self.check_axes(axes):
                idx = idx * self.size(a) + self.coord(a)
            self._index_cache[key] = idx
        return idx

    def group(self, axes: str | Sequence[str]) -> dist.ProcessGroup | None:
        """Process group spanning ``axes`` through this rank (None when its size is 1).

        Group ranks are ordered row-major in *mesh* axis order, whatever order ``axes`` has.
        """
        axes = self.check_axes(axes)
        if not self.contains_me:
            raise ShardingError(f"world rank {self.world_rank} is not part of mesh {self}")
        return self._groups[frozenset(axes)]

    def group_index_order(self, axes: str | Sequence[str]) -> list[int]:
        """For each position p in the *given* axis order, the group rank that holds it.

        Collectives gather in group (mesh) order; this maps it to the requested major-to-minor order.
        """
        axes = self.check_axes(axes)
        canon = tuple(a for a in self.names if a in axes)
        sizes = {a: self.size(a) for a in axes}
        order = []
        for combo in itertools.product(*(range(sizes[a]) for a in axes)):
            c = dict(zip(axes, combo))
            g = 0
            for a in canon:
                g = g * sizes[a] + c[a]
            order.append(g)
        return order

    def group_rank_of(self, axes: str | Sequence[str], index: int) -> int:
        """Group rank (in the :meth:`group` of ``axes``) of the member at linear ``index`` (given order)."""
        return self.group_index_order(axes)[index]

    # ----------------------------------------------------------------- context
    def __enter__(self) -> "Mesh":
        self._tokens = getattr(self, "_tokens", [])
        self._tokens.append(_DEFAULT_MESH.set(self))
        return self

    def __exit__(self, *exc) -> None:
        _DEFAULT_MESH.reset(self._tokens.pop())

    # ----------------------------------------------------------------- value semantics
    def _key(self) -> tuple:
        return (self.shape, self.names)

    def __eq__(self, other: object) -> bool:
        return self is other or (isinstance(other, Mesh) and self._key() == other._key())

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        axes = ", ".join(f"{n}={s}" for n, s in zip(self.names, self.shape))
        return f"Mesh({axes})"

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)


def current_mesh(mesh: "Mesh | None" = None) -> Mesh:
    """``mesh`` if given, else the innermost ``with mesh:`` block's mesh."""
    if mesh is not None:
        return mesh
    m = _DEFAULT_MESH.get()
    if m is None:
        raise ShardingError("no mesh given and no default mesh: pass mesh=... or use `with mesh:`")
    return m


def _validate_shape_names(shape: tuple[int, ...], names: tuple[str, ...]) -> None:
    if len(shape) != len(names):
        raise ShardingError(f"mesh shape {shape} has {len(shape)} axes but {len(names)} names {names}")
    if len(shape) == 0:
        raise ShardingError("a mesh needs at least one axis")
    for n in names:
        if not isinstance(n, str) or not n:
            raise ShardingError(f"mesh axis names must be non-empty strings, got {n!r}")
    if len(set(names)) != len(names):
        raise ShardingError(f"mesh axis names must be unique, got {names}")
    for n, s in zip(names, shape):
        if s < 1:
            raise ShardingError(f"mesh axis {n!r} has size {s}; sizes must be >= 1")


def _unravel(rank: int, shape: tuple[int, ...]) -> list[int]:
    coords = []
    for s in reversed(shape):
        coords.append(rank % s)
        rank //= s
    return coords[::-1]


def _ravel(coord: Sequence[int], shape: tuple[int, ...]) -> int:
    r = 0
    for c, s in zip(coord, shape):
        r = r * s + c
    return r
