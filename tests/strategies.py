"""Hypothesis strategies for meshes, specs and shapes (shared by the sharding tests)."""
from __future__ import annotations

import math

from hypothesis import strategies as st

from meshpar import P

MESHES = [((2,), ("x",)), ((4,), ("x",)), ((8,), ("x",)), ((2, 2), ("x", "y")), ((2, 4), ("x", "y")),
          ((4, 2), ("x", "y")), ((2, 2, 2), ("x", "y", "z")), ((1, 2), ("x", "y"))]
SMALL_MESHES = [m for m in MESHES if math.prod(m[0]) <= 4]


@st.composite
def mesh_spec_shape(draw, ndim: int | None = None, meshes=MESHES, max_mult: int = 3):
    """(mesh_shape, names, spec, global shape) with every split dim divisible."""
    shape, names = draw(st.sampled_from(meshes))
    nd = ndim if ndim is not None else draw(st.integers(1, 3))
    per_dim: list[list[str]] = [[] for _ in range(nd)]
    for a in names:
        d = draw(st.integers(-1, nd - 1))
        if d >= 0:
            per_dim[d].append(a)
    sizes = dict(zip(names, shape))
    gshape = []
    for d in range(nd):
        n = math.prod(sizes[a] for a in per_dim[d])
        gshape.append(n * draw(st.integers(1, max_mult)))
    spec = P(*[tuple(ax) if ax else None for ax in per_dim])
    return shape, names, spec, tuple(gshape)


@st.composite
def spec_for(draw, names, sizes: dict, gshape):
    """A random spec over ``names`` that divides ``gshape``."""
    nd = len(gshape)
    per_dim: list[list[str]] = [[] for _ in range(nd)]
    for a in draw(st.permutations(names)):
        d = draw(st.integers(-1, nd - 1))
        if d >= 0:
            n = math.prod(sizes[b] for b in per_dim[d]) * sizes[a]
            if gshape[d] % n == 0:
                per_dim[d].append(a)
    return P(*[tuple(ax) if ax else None for ax in per_dim])
