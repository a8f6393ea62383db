"""LayerNorm and RMSNorm over a hidden dimension that may be sharded (and padded).

Layout: ``x`` is ``[..., H]`` with the last dimension split over axes ``A`` (possibly none);
``weight``/``bias`` are ``[H]`` with spec ``P(A)`` (the same split), replicated elsewhere. The
output has ``x``'s spec.

Algorithm: each rank sums its block of the hidden dimension; the statistics are completed with
``psum`` over ``A`` (one all-reduce of ``[..., 1]`` for the mean, one for the variance; the
backward pass has the two matching all-reduces). No hidden-sized tensor is communicated. The weight's gradient is summed over the axes that split
``x``'s other dimensions (batch, data, sequence), as any replicated parameter's must be.

Padding: when ``H`` was padded to a multiple of the shard count, pass ``true_size`` (the real
hidden size). Padded positions are masked out of the statistics (values and gradients: the
input's padded gradient is exactly zero) and the padded outputs are zero, so results equal the
dense op on the real part.

``F.layer_norm`` and ``F.rms_norm`` on ShardedTensors are registered with the dispatcher
(normalising the last dimension only).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ShardingError
from ..mesh import Mesh
from ..mesh.autograd import psum, pvary
from ..sharding.core import enter, reduce_unreduced, wrap
from ..sharding.dispatch import register
from ..sharding.layout import block_offset
from ..sharding.spec import P, base_axis
from ..sharding.tensor import ShardedTensor


def _stats_sum(t: torch.Tensor, mesh: Mesh | None, axes: tuple[str, ...]) -> torch.Tensor:
    """Sum over the (split) last dim. The total is replicated over ``axes`` but then scales each rank's
    own hidden slice, so its gradient there is partial: ``pvary`` sums it in backward."""
    s = t.sum(-1, keepdim=True)
    return pvary(psum(s, mesh, axes), mesh, axes) if axes else s


def _real_mask(x: torch.Tensor, true_size: int, offset: int) -> torch.Tensor | None:
    """1 on real hidden positions of a block starting at global ``offset``, 0 on padding (None if no padding)."""
    h = x.shape[-1]
    if offset + h <= true_size:
        return None
    return (torch.arange(offset, offset + h, device=x.device) < true_size).to(x.dtype)


def layer_norm_local(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                     true_size: int, mesh: Mesh | None = None, axes: tuple[str, ...] = (),
                     offset: int = 0) -> torch.Tensor:
    """LayerNorm of a block ``x [..., h]`` whose hidden slice starts at global ``offset``.

    ``true_size`` real hidden positions exist globally; positions ``>= true_size`` are padding:
    they are masked out of the statistics (value and gradient) and produce zeros.
    """
    real = _real_mask(x, true_size, offset)
    if real is not None:
        x = x * real
    mean = _stats_sum(x, mesh, axes) / true_size
    xc = x - mean
    if real is not None:
        xc = xc * real
    var = _stats_sum(xc * xc, mesh, axes) / true_size
    y = xc * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y if real is None else y * real


def rms_norm_local(x: torch.Tensor, weight: torch.Tensor | None, eps: float, true_size: int,
                   mesh: Mesh | None = None, axes: tuple[str, ...] = (), offset: int = 0) -> torch.Tensor:
    """RMSNorm of a block ``x [..., h]`` at hidden ``offset`` (padding masked out, outputs zero there)."""
    real = _real_mask(x, true_size, offset)
    if real is not None:
        x = x * real
    ms = _stats_sum(x * x, mesh, axes) / true_size
    y = x * torch.rsqrt(ms + eps)
    return y * weight if weight is not None else y


def _param_local(p, x: ShardedTensor, name: str, axes: tuple[str, ...]):
    """The block of a norm parameter matching ``x``'s hidden split, with the right gradient sum."""
    if p is None:
        return None
    if not isinstance(p, ShardedTensor):
        raise ShardingError(f"norm {name}: a plain tensor of shape {tuple(p.shape)} was given for a ShardedTensor "
                            f"input with spec {x.spec}; shard it with meshpar.shard({name}, P({axes!r}), mesh)")
    want = P(axes if axes else None)
    if p.ndim != 1 or p.spec.reduced() != want or p.spec.unreduced:
        raise ShardingError(f"norm {name}: spec {p.spec} (shape {tuple(p.shape)}) does not match the input's hidden "
                            f"split; the input {x.spec} needs a 1-d {name} with spec {want}")
    if p.shape[0] != x.shape[-1]:
        raise ShardingError(f"norm {name}: size {p.shape[0]} differs from the input's hidden size {x.shape[-1]}")
    vary = tuple(a for a in x.spec.sharded_axes() if a not in map(base_axis, axes))
    return enter(p, vary)


def _whole_hidden(x: ShardedTensor, axes: tuple[str, ...], n: int) -> bool:
    """Every rank holds the whole unpadded hidden dim (replicated, or split over size-1 axes): torch's fused
    norm kernel on the block computes exactly what the decomposed statistics would."""
    return (not axes or x.mesh.size(axes) == 1) and n == x.shape[-1]


def _prepare(x: ShardedTensor, what: str, true_size: int | None):
    axes = x.spec.axes_of(x.ndim - 1)
    n = x.shape[-1]
    true_size = n if true_size is None else int(true_size)
    if not 0 < true_size <= n:
        raise ShardingError(f"{what}: true_size {true_size} must be in [1, {n}] (the padded hidden size)")
    # the hidden offset only places the padding mask (a zigzag hidden dim works unpadded)
    off = 0 if true_size == n else block_offset(x._gshape, x.spec, x.mesh, -1)
    if x.spec.unreduced:
        x = reduce_unreduced(x)
    return x, axes, true_size, off


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               eps: float = 1e-5, *, true_size: int | None = None) -> torch.Tensor:
    """LayerNorm over the last dimension of a plain tensor or a ShardedTensor ``[..., H]``.

    Args:
        x: input; for a ShardedTensor the last dim may be split over any axes ``A``.
        weight, bias: ``[H]``, spec ``P(A)`` (or None).
        true_size: real hidden size when ``H`` is padded (padding must be zero).
    Returns:
        ``[..., H]`` with ``x``'s spec.
    """
    if not isinstance(x, ShardedTensor):
        n = x.shape[-1] if true_size is None else true_size
        if n == x.shape[-1]:
            return F.layer_norm(x, (n,), weight, bias, eps)
        return layer_norm_local(x, weight, bias, eps, n)
    x, axes, n, off = _prepare(x, "layer_norm", true_size)
    w = _param_local(weight, x, "weight", axes)
    b = _param_local(bias, x, "bias", axes)
    if _whole_hidden(x, axes, n):
        y = F.layer_norm(enter(x), (n,), w, b, eps)
    else:
        y = layer_norm_local(enter(x), w, b, eps, n, x.mesh, axes, off)
    return wrap(y, x.spec, x.mesh, x._gshape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6, *,
             true_size: int | None = None) -> torch.Tensor:
    """RMSNorm over the last dimension (see :func:`layer_norm` for layouts and padding)."""
    if not isinstance(x, ShardedTensor):
        n = x.shape[-1] if true_size is None else true_size
        return rms_norm_local(x, weight, eps, n)
    x, axes, n, off = _prepare(x, "rms_norm", true_size)
    w = _param_local(weight, x, "weight", axes)
    if _whole_hidden(x, axes, n):
        y = F.rms_norm(enter(x), (n,), w, eps)
    else:
        y = rms_norm_local(enter(x), w, eps, n, x.mesh, axes, off)
    return wrap(y, x.spec, x.mesh, x._gshape)


def _normalized_last_only(normalized_shape, x) -> bool:
    ns = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    return len(ns) == 1 and ns[0] == x.shape[-1]


@register(F.layer_norm)
def _layer_norm_rule(func, args, kwargs):
    a = dict(zip(("input", "normalized_shape", "weight", "bias", "eps"), args))
    a.update(kwargs)
    x = a["input"]
    if not isinstance(x, ShardedTensor):
        return NotImplemented
    if not _normalized_last_only(a["normalized_shape"], x):
        raise ShardingError(f"layer_norm on a ShardedTensor normalises the last dimension only; got normalized_shape "
                            f"{a['normalized_shape']} for shape {tuple(x.shape)}")
    return layer_norm(x, a.get("weight"), a.get("bias"), a.get("eps", 1e-5))


@register(F.rms_norm)
def _rms_norm_rule(func, args, kwargs):
    a = dict(zip(("input", "normalized_shape", "weight", "eps"), args))
    a.update(kwargs)
    x = a["input"]
    if not isinstance(x, ShardedTensor):
        return NotImplemented
    if not _normalized_last_only(a["normalized_shape"], x):
        raise ShardingError(f"rms_norm on a ShardedTensor normalises the last dimension only; got normalized_shape "
                            f"{a['normalized_shape']} for shape {tuple(x.shape)}")
    eps = a.get("eps")
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    return rms_norm(x, a.get("weight"), eps)
