"""Elementwise ops with broadcasting: unary, binary, activations, casts.

Output spec: each output dimension takes the axes of the operands that split it (they must
agree, or be a prefix of one another; a :class:`~meshpar.Zigzag` split agrees only with the same
zigzag split, so zigzag and contiguous operands are never mixed silently). A replicated operand is sliced for free where the
output is split; where it broadcasts over a split dimension it *varies* and its gradient is
summed. Unreduced operands stay unreduced through linear ops (``a+b`` with equal unreduced
axes, ``-a``, ``a*c``/``a/c`` with ``c`` not unreduced) and are reduced first otherwise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ShardingError
import functools

from ..sharding.core import apply_plan, enter, grad_executor, local_in, meta, operand_plan, reduce_unreduced, wrap
from ..sharding.dispatch import FAST, FAST_GRAD, register, signature
from ..sharding.grad_api import NON_LEAF_REQUIRES_GRAD
from ..sharding.semantics import desc, float_cast, keep_partial
from ..sharding.spec import P, base_axis
from ..sharding.tensor import ShardedTensor, blockwise_exec, layout, make_block_graph, new_sharded
from ._util import common_mesh

T = torch.Tensor

_ADD = [torch.add, T.add, T.__add__, T.__radd__, torch.sub, T.sub, T.__sub__, T.__rsub__, torch.subtract, T.subtract]
_MUL = [torch.mul, T.mul, T.__mul__, T.__rmul__, torch.multiply, T.multiply]
_DIV = [torch.div, T.div, T.__truediv__, torch.true_divide, T.true_divide, torch.divide, T.divide]
_NEG = [torch.neg, T.neg, T.__neg__, torch.negative, T.negative, T.__pos__]
_OTHER_BINARY = [T.__rtruediv__, torch.pow, T.pow, T.__pow__, T.__rpow__, torch.maximum, T.maximum,
                 torch.minimum, T.minimum, torch.eq, T.eq, T.__eq__, torch.ne, T.ne, T.__ne__, torch.lt, T.lt,
                 T.__lt__, torch.le, T.le, T.__le__, torch.gt, T.gt, T.__gt__, torch.ge, T.ge, T.__ge__,
                 torch.where, T.where, torch.atan2, torch.fmod, T.fmod, torch.remainder, T.remainder,
                 T.__mod__, torch.logical_and, T.logical_and, torch.logical_or, T.logical_or, T.__and__, T.__or__,
                 T.__xor__, torch.addcmul, T.addcmul, torch.addcdiv, T.addcdiv, torch.lerp, T.lerp,
                 torch.clamp, T.clamp, torch.clip, T.clip, torch.masked_fill, T.masked_fill, T.type_as,
                 torch.floor_divide, T.floor_divide, T.__floordiv__, torch.hypot, torch.xlogy]
_UNARY = [torch.exp, T.exp, torch.log, T.log, torch.log1p, T.log1p, torch.expm1, T.expm1, torch.sqrt, T.sqrt,
          torch.rsqrt, T.rsqrt, torch.abs, T.abs, T.__abs__, torch.sin, T.sin, torch.cos, T.cos, torch.tanh,
          T.tanh, torch.sigmoid, T.sigmoid, torch.square, T.square, torch.reciprocal, T.reciprocal, torch.sign,
          T.sign, torch.erf, T.erf, torch.floor, T.floor, torch.ceil, T.ceil, torch.round, T.round, torch.isnan,
          T.isnan, torch.isinf, T.isinf, torch.isfinite, T.isfinite, torch.logical_not, T.logical_not,
          T.__invert__, torch.nan_to_num, T.nan_to_num, torch.exp2, torch.log2, T.log2, torch.trunc,
          F.relu, torch.relu, T.relu, F.gelu, F.silu, F.tanh, F.sigmoid, F.softplus, F.leaky_relu, F.elu,
          F.mish, F.hardtanh, F.relu6, F.logsigmoid, F.selu, F.celu, torch.nn.functional.hardswish,
          T.float, T.double, T.half, T.bfloat16, T.to, T.contiguous, T.clone, torch.clone, T.detach,
          torch.detach, T.conj, torch.conj, T.type, T.int, T.long, T.bool, T.cpu, T.cuda, T.zero_,
          torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, T.new_zeros, T.new_ones, T.new_empty, T.new_full, T.pin_memory]
_INPLACE = [T.add_, T.sub_, T.mul_, T.div_, T.__iadd__, T.__isub__, T.__imul__, T.__itruediv__, T.addcmul_,
            T.addcdiv_, T.lerp_, T.copy_, T.clamp_, T.sqrt_, T.exp_, T.neg_, T.pow_, T.fill_, T.zero_,
            T.masked_fill_, T.abs_, T.relu_, T.requires_grad_]

_NEW_SHAPE = {T.new_zeros, T.new_ones, T.new_empty, T.new_full}
_LIKE_FACTORY = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like}


_CAST_TO = {T.float: torch.float32, T.double: torch.float64, T.half: torch.float16, T.bfloat16: torch.bfloat16}


def _cast_dtype(args, kwargs):
    """The dtype a ``.to(...)``/``.type(...)`` call casts to (None: unchanged)."""
    for v in list(args[1:]) + list(kwargs.values()):
        if isinstance(v, torch.dtype):
            return v
        if isinstance(v, torch.Tensor):
            return v.dtype
        if isinstance(v, str) and v.startswith("torch."):
            return getattr(torch, v.split(".", 1)[1], None)
    return None


def _out_axes(metas, out_ndim: int) -> list[tuple[str, ...]]:
    out = [()] * out_ndim
    for m in metas:
        if m[0] != "S":
            continue
        spec, shp = m[1], m[2]
        off = out_ndim - len(shp)
        for d in range(len(shp)):
            ax = spec.axes_of(d)
            if not ax:
                continue
            cur = out[off + d]
            if not cur or cur[: len(ax)] == ax:
                out[off + d] = cur if len(cur) >= len(ax) else ax
            elif ax[: len(cur)] == cur:
                out[off + d] = ax
            else:
                raise ShardingError(f"operands split output dim {off + d} differently ({cur} vs {ax}); "
                                    "reshard one of them to match the other")
    seen = {}
    for d, ax in enumerate(out):
        for a in map(base_axis, ax):
            if a in seen and seen[a] != d:
                raise ShardingError(f"mesh axis {a!r} splits dim {seen[a]} of one operand and dim {d} of another; "
                                    "reshard one of them")
            seen[a] = d
    return out


@functools.lru_cache(maxsize=8192)
def _plan(func, metas: tuple, linear: str, values: tuple):
    """(reduce flags, out spec, out shape, operand plans) for operands described by ``metas``.

    ``values``: descriptors of the call's value operands (:func:`meshpar.sharding.semantics.desc`),
    which the linearity table reads to decide whether partial sums may stay unreduced."""
    keep: tuple[str, ...] = ()
    reduce = [False] * len(metas)
    if any(m is not None and m[0] == "S" and m[1].unreduced for m in metas):
        kind = "scale" if linear == "scale" else ("add" if linear == "add" else linear)
        k = keep_partial(kind, values, func in _DIV_SET)
        if k is not None:
            keep = k
        else:
            reduce = [m is not None and m[0] == "S" and bool(m[1].unreduced) for m in metas]
            metas = tuple(("S", m[1].reduced(), m[2]) if r else m for m, r in zip(metas, reduce))
    shapes = [m[2] if m[0] == "S" else m[1] for m in metas if m is not None]
    out_shape = tuple(torch.broadcast_shapes(*shapes)) if shapes else ()
    out_spec = P.from_axes(_out_axes([m for m in metas if m is not None], len(out_shape)), unreduced=keep)
    plans = tuple(operand_plan(m, out_spec, len(out_shape)) for m in metas)
    return tuple(reduce), out_spec, out_shape, plans


_DIV_SET = frozenset(_DIV)


def blockwise_executor(func, plans, out_spec: P, out_shape, mesh):
    """A no-autograd executor ``ex(args, kwargs)``: take blocks (free slices), run ``func``, wrap.

    Only for calls without keyword arguments (the key of a call with keywords differs)."""
    lay = layout(out_spec, out_shape, mesh)
    steps = [None if p is None else tuple((d, mesh.size(ax), mesh.axis_index(ax)) for d, ax in p.slices)
             for p in plans]
    if all(st == () for st in steps) and 1 <= len(steps) <= 3:  # every operand a ShardedTensor in place
        return blockwise_exec(func, lay, len(steps))

    def run(args, kw):
        locs = []
        for a, st in zip(args, steps):
            if st is None:
                locs.append(a)
                continue
            loc = a._local if type(a) is ShardedTensor else a
            for d, n, i in st:
                loc = loc.chunk(n, dim=d)[i]
            locs.append(loc)
        return new_sharded(func(*locs), lay)
    return run


def remember_blockwise(key, func, plans, out_spec: P, out_shape, mesh) -> None:
    """Memoise a planned blockwise call under ``key`` in the current grad mode's table: the no-autograd
    executor, or the grad-mode one (operands entered per their plans, one wrap node)."""
    if key is None:
        return
    if torch.is_grad_enabled():
        FAST_GRAD.remember(key, grad_executor(func, plans, out_spec, out_shape, mesh))
    else:
        FAST.remember(key, blockwise_executor(func, plans, out_spec, out_shape, mesh))


def elementwise(func, args: tuple, kwargs: dict, *, linear: str = "no"):
    """Run ``func`` blockwise. ``linear`` (the linearity table's kind, see :mod:`meshpar.sharding.semantics`):
    "add" (sum of operands), "scale" (linear in one operand), "linear" (one operand), "no"."""
    keys = tuple(kwargs)
    vals = tuple(args) + tuple(kwargs.values())
    mesh = common_mesh([v for v in vals if isinstance(v, ShardedTensor)])
    metas = tuple(meta(v) for v in vals)
    values = tuple(d for d in map(desc, args) if d is not None) + tuple(
        desc(v) for v in kwargs.values() if isinstance(v, torch.Tensor))
    reduce, out_spec, out_shape, plans = _plan(func, metas, linear, values)
    if not any(reduce) and not kwargs:
        if not torch.is_grad_enabled():
            FAST.remember(signature(func, args, kwargs), blockwise_executor(func, plans, out_spec, out_shape, mesh))
        else:
            FAST_GRAD.remember(signature(func, args, kwargs), grad_executor(func, plans, out_spec, out_shape, mesh))
    locs = []
    for v, r, p in zip(vals, reduce, plans):
        if r:
            v = reduce_unreduced(v)
        locs.append(apply_plan(v, p, mesh))
    n = len(args)
    out = func(*locs[:n], **dict(zip(keys, locs[n:])))
    return wrap(out, out_spec, mesh, out_shape)


@register(*_ADD)
def _add(func, args, kwargs):
    return elementwise(func, args, kwargs, linear="add")


@register(*_MUL, *_DIV)
def _mul(func, args, kwargs):
    if kwargs.get("rounding_mode") is not None:  # floor/trunc division is not linear: reduce partial sums first
        return elementwise(func, args, kwargs)
    return elementwise(func, args, kwargs, linear="scale")


@register(*_NEG)
def _neg(func, args, kwargs):
    return elementwise(func, args, kwargs, linear="linear")


@register(*_OTHER_BINARY)
def _binary(func, args, kwargs):
    return elementwise(func, args, kwargs)


@register(*_UNARY)
def _unary(func, args, kwargs):
    x = args[0]
    if not isinstance(x, ShardedTensor):
        return elementwise(func, args, kwargs)
    if func in _NEW_SHAPE:
        with torch._C.DisableTorchFunctionSubclass():
            return func(x._local, *args[1:], **kwargs)
    if func in _LIKE_FACTORY:
        from ..sharding.tensor import ShardedTensor as ST
        rg = kwargs.pop("requires_grad", False)
        out = ST(func(x._local, *args[1:], **kwargs), x.spec.reduced(), x.mesh, x._gshape)
        return out.requires_grad_(rg) if rg else out
    linear = "no"
    if func in (T.contiguous, T.clone, torch.clone, T.detach, torch.detach, T.cpu, T.cuda):
        linear = "linear"
    elif func in _CAST_TO and float_cast(_CAST_TO[func], x.dtype):
        linear = "linear"
    elif func in (T.to, T.type) and float_cast(_cast_dtype(args, kwargs), x.dtype):
        linear = "linear"
    if func in (T.detach, torch.detach):
        return ShardedTensor(x._local.detach(), x.spec, x.mesh, x._gshape)
    return elementwise(func, args, kwargs, linear=linear)


def keep_grad_layout(leaf: ShardedTensor) -> None:
    """Give a leaf's gradient the leaf's layout (fully reduced) before it is accumulated into ``.grad``.

    Gradients that come through the exact aten fallback may arrive replicated (``P()``) or in
    another layout; optimizers and ZeRO read ``.grad``'s block as the parameter's block, so it is
    resharded here (a free slice from ``P()``). Registered once per leaf."""
    if getattr(leaf, "_meshpar_grad_hook", False):
        return
    spec, mesh, shape = leaf.spec.reduced(), leaf.mesh, leaf._gshape
    holder = [leaf]  # a strong reference: weak references would block nn.Module._apply's tensor swap

    def hook(g):
        if g is None:  # an undefined gradient (a backward formula's zero): nothing to lay out
            return g
        defer = tuple(getattr(holder[0], "_meshpar_defer_reduce", ()) or ())
        if isinstance(g, ShardedTensor):
            if g.spec == spec or (defer and g.spec.reduced() == spec and set(g.spec.unreduced) <= set(defer)):
                return g
            from ..sharding.generic import block_as
            with torch.no_grad():
                return ShardedTensor(block_as(g, spec, "gradient"), spec, mesh, shape)
        from ..sharding.layout import take_block
        return ShardedTensor(take_block(g, spec, mesh).contiguous(), spec, mesh, shape)
    leaf.register_hook(hook)
    leaf._meshpar_grad_hook = True


_SCALE_INPLACE = frozenset({T.mul_, T.div_, T.__imul__, T.__itruediv__})
_ADD_INPLACE = frozenset({T.add_, T.sub_, T.__iadd__, T.__isub__})


def _local_inplace_ok(func, target: ShardedTensor, others, kwargs: dict) -> bool:
    """True when the in-place op may run on the blocks as they are (linearity table, layouts)."""
    u = target.spec.unreduced
    vals = [desc(target)] + [d for d in map(desc, others) if d is not None]
    if not u:
        return not any(d[0] == "S" and d[1].unreduced for d in vals)
    if func in _ADD_INPLACE:
        return keep_partial("add", vals) == u
    if func in _SCALE_INPLACE:
        if kwargs.get("rounding_mode") is not None:
            return False
        return keep_partial("scale", vals, True) == u
    if func is T.zero_:
        return True
    return False


@register(*_INPLACE)
def _inplace(func, args, kwargs):
    """In-place ops that run on the blocks as they are; everything else goes to the exact aten
    fallback (which writes the new value back in ``target``'s layout)."""
    target = args[0]
    if func is T.requires_grad_:
        if isinstance(target, ShardedTensor) and target._bg:  # a computed result: torch's rule for non-leaves
            if not (args[1] if len(args) > 1 else kwargs.get("requires_grad", True)):
                raise RuntimeError(NON_LEAF_REQUIRES_GRAD)
            return target
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if isinstance(target, ShardedTensor):
            target._ent = None  # its entered block (core.enter) follows requires_grad
            if target.requires_grad and target.is_leaf:
                keep_grad_layout(target)
        return out
    if not isinstance(target, ShardedTensor):
        return NotImplemented
    grad = torch.is_grad_enabled() and (target.requires_grad or any(
        isinstance(a, torch.Tensor) and a.requires_grad for a in list(args[1:]) + list(kwargs.values())))
    if grad and target.requires_grad and not target._bg:
        # a leaf (torch refuses the write) or a wrapper carrying its own graph: autograd records it at the aten level
        return NotImplemented
    # a block-graph result, or a tensor without a graph: the write runs on the block, recorded there
    others = [a for a in list(args[1:]) + list(kwargs.values()) if isinstance(a, (torch.Tensor, int, float, bool))]
    if func is T.copy_:
        src = args[1]
        if isinstance(src, ShardedTensor) and src.spec == target.spec and src._gshape == target._gshape:
            (target._lg if target._bg else target._local).copy_(enter(src) if grad else src._local)
            return _joined_graph(target) if grad else target
        return NotImplemented
    if not _local_inplace_ok(func, target, others, kwargs):
        return NotImplemented
    mesh = target.mesh
    nd = len(target._gshape)
    out_spec = target.spec.reduced()
    try:
        for a in others:
            if isinstance(a, ShardedTensor):
                if a.mesh != mesh:
                    raise ShardingError(f"in-place {func.__name__}: operands live on different meshes")
                operand_plan(meta(a), out_spec, nd)
                if _split_where_target_is_not(a, out_spec, nd):
                    return NotImplemented
    except ShardingError:
        return NotImplemented  # layouts differ: the aten fallback reshards
    # per-rank results differ over the target's split and unreduced axes: operands replicated over those
    # get their gradients summed over them
    used = target.spec.used_axes()
    lo = [local_in(a, out_spec, nd, mesh, used) if isinstance(a, torch.Tensor) else a for a in args[1:]]
    kw = {k: (local_in(v, out_spec, nd, mesh, used) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    func(target._lg if target._bg else target._local, *lo, **kw)
    return _joined_graph(target) if grad else target


def _split_where_target_is_not(a: ShardedTensor, out_spec: P, nd: int) -> bool:
    """Whether operand ``a`` is split on a (non-broadcast) dim over axes the in-place target's dim is not
    split over: its block then holds only part of what each target block needs (the fallback gathers it).
    Found by the in-place property test: ``P()``-target ``add_(P("x")-operand)`` broadcast each rank's
    half of the operand over the whole target block."""
    off = nd - len(a._gshape)
    for d in range(len(a._gshape)):
        xax = a.spec.axes_of(d)
        if xax and a._gshape[d] != 1 and (off + d < 0 or out_spec.axes_of(off + d)[:len(xax)] != xax):
            return True
    return False


def _joined_graph(target: ShardedTensor) -> ShardedTensor:
    """After an in-place write under autograd into ``target``'s block: a target without a graph whose block
    now carries one (it was written from operands that require grad) becomes a block-graph result."""
    if not target._bg and target._local.requires_grad:
        make_block_graph(target)
    return target
