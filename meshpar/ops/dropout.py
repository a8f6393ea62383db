"""Layout-independent dropout: an element's mask depends only on (seed, site, its global coordinates).

Each element's keep/drop decision is a counter-based hash of ``seed``, a ``site`` number (which
dropout call in the model) and the element's **global** index along every dimension. A rank
computes the mask of its own block from the block's global offsets, so

* the sharded result equals the dense result for the same seed, bit for bit;
* ranks that hold the same (replicated) values draw the same mask, with no communication;
* the mask does not depend on how many ranks there are or how the tensor is padded.

The hash is murmur3's 32-bit finaliser applied coordinate by coordinate, computed in int64
with no overflow (32x32-bit products are split into 16-bit halves).

``F.dropout`` on a ShardedTensor is routed here too (registered with the dispatcher); with no
explicit seed it draws one from the mesh's shared random stream (after ``meshpar.manual_seed``)
or else from torch's default generator (so ranks must then be seeded alike). Prefer :func:`dropout`
with an explicit ``seed`` for reproducible masks.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import ShardingError
from ..sharding.core import enter, wrap
from ..sharding.dispatch import register
from ..sharding.layout import block_offset, block_positions
from ..sharding.tensor import ShardedTensor

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for int64 ``x`` in [0, 2**32) without int64 overflow."""
    lo = x & 0xFFFF
    hi = x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _M32


def _fmix(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _combine(h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _fmix(_mul32(h, 0x01000193) ^ (v & _M32))


def uniform(shape: Sequence[int], offsets: Sequence, seed: int, site: int = 0,
            device: torch.device | str | None = None) -> torch.Tensor:
    """Deterministic uniforms in [0, 1) (float64) for the block ``[offsets, offsets + shape)``.

    Args:
        shape: block shape (local).
        offsets: per dimension, the global index of the block's first element (an int), or the
            global indices of all its rows (a 1-d int64 tensor of length ``shape[d]``, e.g. a
            zigzag dim's :func:`~meshpar.sharding.layout.block_positions`).
        seed, site: the stream; different (seed, site) pairs give independent masks.
    """
    if len(shape) != len(offsets):
        raise ValueError(f"shape {tuple(shape)} and offsets {tuple(offsets)} differ in length")
    h = torch.tensor(0x9E3779B9, dtype=torch.int64, device=device)
    for word in (seed & _M32, (seed >> 32) & _M32, site & _M32, (site >> 32) & _M32):
        h = _combine(h, torch.tensor(word, dtype=torch.int64, device=device))
    nd = len(shape)
    for d, (n, o) in enumerate(zip(shape, offsets)):
        view = [1] * nd
        view[d] = n
        coord = (o.to(device=device, dtype=torch.int64) if isinstance(o, torch.Tensor)
                 else torch.arange(o, o + n, dtype=torch.int64, device=device)).view(view)
        h = _combine(h, coord)
    h = h.expand(tuple(shape)) if nd else h
    return (h >> 8).to(torch.float64) * (1.0 / (1 << 24))


def keep_mask(shape: Sequence[int], offsets: Sequence[int], p: float, seed: int, site: int = 0,
              device=None) -> torch.Tensor:
    """Boolean keep-mask (True = keep, probability ``1 - p``) of a block at ``offsets``."""
    return uniform(shape, offsets, seed, site, device) >= p


def _check_p(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")


def dropout_local(x: torch.Tensor, offsets: Sequence[int], p: float, seed: int, site: int = 0) -> torch.Tensor:
    """Dropout of a plain block ``x`` whose first element sits at global ``offsets``."""
    _check_p(p)
    if p == 0.0:
        return x
    m = keep_mask(x.shape, offsets, p, seed, site, x.device)
    return x * m.to(x.dtype) * (1.0 / (1.0 - p))


def dropout(x: torch.Tensor, p: float, *, seed: int, site: int = 0, train: bool = True) -> torch.Tensor:
    """Dropout with a layout-independent mask.

    Args:
        x: a plain tensor (dense) or a ShardedTensor of any spec (not unreduced).
        p: drop probability; kept values are scaled by ``1 / (1 - p)``.
        seed, site: the random stream (same seed and site give the same mask as the dense op).
        train: identity when False.
    Returns:
        same type, shape and spec as ``x``.
    """
    _check_p(p)
    if not train or p == 0.0:
        return x
    if not isinstance(x, ShardedTensor):
        return dropout_local(x, (0,) * x.ndim, p, seed, site)
    if x.spec.unreduced:
        raise ShardingError(f"dropout: input is unreduced over {x.spec.unreduced} (a partial sum); masking a "
                            "partial sum is not the dropout of the sum. reshard(x, P(*x.spec.entries)) first")
    off = [block_positions(x._gshape, x.spec, x.mesh, d) if x.spec.layout_of(d) == "zigzag"
           else block_offset(x._gshape, x.spec, x.mesh, d) for d in range(x.ndim)]
    loc = dropout_local(enter(x), off, p, seed, site)
    return wrap(loc, x.spec, x.mesh, x._gshape)


@register(F.dropout)
def _dropout_rule(func, args, kwargs):
    names = ("input", "p", "training", "inplace")
    a = dict(zip(names, args))
    a.update(kwargs)
    x = a.get("input")
    if not isinstance(x, ShardedTensor):
        return NotImplemented
    p, training = float(a.get("p", 0.5)), bool(a.get("training", True))
    if not training or p == 0.0:
        return x
    from ..sharding.generic import next_seed
    seed = next_seed(x.mesh)  # the mesh's shared stream: every rank draws the same seed
    return dropout(x, p, seed=seed, train=True)
