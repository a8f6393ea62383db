"""``__torch_dispatch__``: the long tail of aten ops, propagated below autograd.

Every aten op that reaches a ShardedTensor without a ``__torch_function__`` rule lands here,
after the autograd engine recorded it (so the backward is made of aten ops that land here too).

* **pointwise** ops (``torch.Tag.pointwise``, in-place variants included): the result is split
  the way the operands split it; a replicated or plain operand is sliced for free; an operand
  split differently is resharded (an implicit collective). Partial sums follow the linearity
  table of :mod:`.semantics`: they stay unreduced only through linear ops, else they are summed
  first. An in-place op keeps ``self``'s layout.
* ``*_like`` factories, ``detach``/``alias``/``clone``/``_to_copy``: same layout (integer casts of
  partial sums are summed first).
* **random** ops (``torch.Tag.nondeterministic_seeded``): the global random value is drawn from the
  mesh's shared stream (:func:`.generic.shared_rng`) and each rank keeps its block, so replicas agree
  and the value does not depend on the layout.
* **in-place view ops** (``unsqueeze_``, ``squeeze_``, ``transpose_``, ``t_``): the block gets the same
  view, the spec's entries move with the dims, and the wrapper's own sizes change (meta kernel).
* ``_conj``/``_neg_view``/``resolve_conj``/``resolve_neg``: the same op on the block, same layout;
  the wrapper carries the block's conj/neg bit (:func:`.tensor.mirror_math_bits`).
* **anything else**: exact generic fallback: partial sums are summed, blocks all-gathered, the op
  runs on the global values, and the result is replicated ``P()``; an in-place or ``out=`` op writes
  the new value back into its argument in that argument's layout (a plain ``out`` is written and
  returned as is). With every operand already replicated this needs no communication. A view op
  aliases a replicated block; a view computed on a copy is a detached view (:mod:`.views`). Inside
  :func:`meshpar.strict` any collective refuses.

Every op that writes a ShardedTensor's block bumps the block's version counter (torch does not,
below autograd), and detached views among the operands are refreshed before and written through
after the op.
"""
from __future__ import annotations

import functools

import torch
from torch.autograd.graph import increment_version
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ..errors import ShardingError
from ..mesh import collectives as C
from .generic import common_mesh, global_value, operand_block, shared_rng, write_value
from .layout import take_block
from .semantics import check_output, desc, float_cast, keep_partial, op_label
from .spec import P
from . import views
from .tensor import _FAST_ATEN, ShardedTensor, fast_key, layout, new_sharded

aten = torch.ops.aten
_POINTWISE = torch.Tag.pointwise
_RANDOM = torch.Tag.nondeterministic_seeded

_LIKE = {aten.ones_like.default, aten.zeros_like.default, aten.empty_like.default, aten.full_like.default}
_SAME = {aten.detach.default, aten.alias.default}
# ops whose result depends on the operand's strides: they see the contiguous strides the wrapper reports
_STRIDE_READERS = frozenset(getattr(aten, n).default for n in ("as_strided", "as_strided_copy", "as_strided_scatter",
                                                                "_reshape_alias") if hasattr(aten, n))
# in-place view ops: they change the tensor's own metadata (see _inplace_view)
_INPLACE_VIEWS = frozenset(getattr(aten, n) for n in ("unsqueeze_", "squeeze_", "transpose_", "swapdims_", "swapaxes_",
                                                     "t_", "detach_", "as_strided_", "set_") if hasattr(aten, n))
# blockwise and additive (f(sum of shares) = sum of f(shares)): the result keeps the operand's layout,
# partial sums included; _conj/_neg_view are lazy views (the bit goes to the block and the wrapper)
_MATH_VIEWS = {aten._conj.default, aten._neg_view.default, aten.resolve_conj.default, aten.resolve_neg.default,
               aten._conj_copy.default, aten._neg_view_copy.default}
# linearity of aten ops (see meshpar.sharding.semantics): every other op is non-linear
_KIND = {aten.add.Tensor: "add", aten.add_.Tensor: "add", aten.sub.Tensor: "add", aten.sub_.Tensor: "add",
         aten.add.Scalar: "add", aten.add_.Scalar: "add", aten.sub.Scalar: "add", aten.sub_.Scalar: "add",
         aten.neg.default: "linear", aten.neg_.default: "linear", aten.clone.default: "linear",
         aten.mul.Tensor: "scale", aten.mul_.Tensor: "scale", aten.mul.Scalar: "scale", aten.mul_.Scalar: "scale",
         aten.div.Tensor: "div", aten.div_.Tensor: "div", aten.div.Scalar: "div", aten.div_.Scalar: "div",
         aten.zero_.default: "linear", aten.conj_physical.default: "linear", aten.conj_physical_.default: "linear",
         aten._conj_physical.default: "linear"}
_LINEAR_FOREACH = frozenset({"aten::_foreach_add", "aten::_foreach_add_", "aten::_foreach_sub", "aten::_foreach_sub_",
                             "aten::_foreach_mul", "aten::_foreach_mul_", "aten::_foreach_div", "aten::_foreach_div_",
                             "aten::_foreach_neg", "aten::_foreach_neg_", "aten::_foreach_zero_",
                             "aten::_foreach_copy_"})
# random ops that overwrite their first argument without reading its values
_OVERWRITE = frozenset(getattr(getattr(aten, op), ov) for op, ov in (
    ("rand_like", "default"), ("randn_like", "default"), ("randint_like", "default"), ("randint_like", "low_dtype"),
    ("uniform_", "default"), ("normal_", "default"), ("bernoulli_", "float"), ("exponential_", "default"),
    ("random_", "default"), ("random_", "from"), ("random_", "to"), ("geometric_", "default"),
    ("cauchy_", "default"), ("log_normal_", "default")) if hasattr(getattr(aten, op), ov))


def _wrap(local: torch.Tensor, spec: P, mesh, shape) -> ShardedTensor:
    check_output(local, spec, mesh, shape)
    return ShardedTensor(local, spec, mesh, tuple(shape))


@functools.lru_cache(maxsize=4096)
def _mutated(func) -> tuple[int, ...]:
    """Positions (in the schema's argument list) of the arguments ``func`` writes to (memoised per op)."""
    return tuple(i for i, a in enumerate(func._schema.arguments) if a.alias_info is not None and a.alias_info.is_write)


def handle_dispatch(func, args, kwargs):
    """Run one aten op on ShardedTensor operands (see the module docstring); detached views among the
    operands are refreshed before and written through after (:mod:`.views`)."""
    g = views.guard(args, kwargs)
    out = _dispatch(func, args, kwargs)
    if _mutated(func):
        mark_written(func, args, kwargs)
    return out if g is None else g.done(func, args, kwargs, out)


def mark_written(func, args, kwargs) -> None:
    """Bump the version counter of every ShardedTensor block ``func`` wrote. Below autograd torch does
    not (the ADInplaceOrView key is excluded there), and detached views (:mod:`.views`) and autograd's
    saved-tensor checks rely on it."""
    schema_args = func._schema.arguments
    for i in _mutated(func):
        a = args[i] if i < len(args) else kwargs.get(schema_args[i].name)
        for t in (a if isinstance(a, (list, tuple)) else (a,)):
            if isinstance(t, ShardedTensor):
                increment_version(t._local)


def _dispatch(func, args, kwargs):
    name = func._schema.name
    if func is aten._local_scalar_dense.default:
        x = args[0]
        loc = x._local
        if x.spec.unreduced:
            loc = C.all_reduce(loc, x.mesh, x.spec.unreduced)
        return loc.item()
    if name.startswith("aten::_foreach_"):
        return _foreach(func, args, kwargs)
    x0 = args[0] if args else None
    if func in _LIKE and isinstance(x0, ShardedTensor):
        return _wrap(func(x0._local, *args[1:], **kwargs), x0.spec.reduced(), x0.mesh, x0._gshape)
    if (func in _SAME or func in _MATH_VIEWS) and isinstance(x0, ShardedTensor):
        return _wrap(func(x0._local), x0.spec, x0.mesh, x0._gshape)
    if func is aten._to_copy.default and isinstance(x0, ShardedTensor):
        spec = x0.spec if float_cast(kwargs.get("dtype"), x0.dtype) else x0.spec.reduced()
        loc = operand_block(x0, spec, len(x0._gshape), x0.mesh, spec.unreduced, name)
        return _wrap(func(loc, **kwargs), spec, x0.mesh, x0._gshape)
    if func is aten.copy_.default:
        return _copy(args[0], args[1], kwargs)
    if func in (aten.resize_.default, aten.resize_as_.default) and isinstance(x0, ShardedTensor):
        size = tuple(args[1].shape if func is aten.resize_as_.default else args[1])
        if size == tuple(x0._gshape):
            return x0
        if x0.spec.unreduced:
            raise ShardingError(f"{op_label(name)}: resizing the partial sum {x0.spec} would resize each rank's share; "
                                f"reduce it first (meshpar.reshard(x, {x0.spec.reduced()})) or build a new tensor")
    if func.overloadpacket in _INPLACE_VIEWS and isinstance(x0, ShardedTensor):
        return _inplace_view(func, args, kwargs)
    tags = func.tags
    if _RANDOM in tags:
        return _generic(func, args, kwargs, random=True)
    if _POINTWISE in tags:
        return _pointwise(func, args, kwargs)
    return _generic(func, args, kwargs)


def _inplace_view(func, args, kwargs) -> ShardedTensor:
    """An in-place view op (``unsqueeze_``, ``squeeze_``, ``transpose_``, ``t_``, ``detach_``, ...) on a
    ShardedTensor: like dense torch, it changes the tensor's own metadata. The block becomes the same
    view of the block (a new view object: other tensors sharing the block keep theirs), the spec's
    entries move with the dims, and the wrapper's sizes are updated in place by the op's meta kernel
    (as torch's ``return_and_correct_aliasing`` does). Ops that reinterpret storage (``as_strided_``,
    ``set_``) refuse."""
    x = args[0]
    name = func._schema.name
    nd = len(x._gshape)
    axes = list(x.spec.padded(nd))
    op = func.overloadpacket
    kw = dict(zip([a.name for a in func._schema.arguments], args)) | kwargs
    if op is aten.detach_:
        x._local = x._local.detach()
        return x
    if op is aten.unsqueeze_:
        d = kw["dim"] % (nd + 1)
        axes.insert(d, ())
        redo = lambda t: t.unsqueeze(d)  # noqa: E731 - the same view of a plain tensor (block or global value)
    elif op is aten.squeeze_:
        dims = kw.get("dim", kw.get("dims"))
        dims = range(nd) if dims is None else ([dims] if isinstance(dims, int) else list(dims))
        drop = tuple(sorted({d % nd for d in dims if x._gshape[d % nd] == 1})) if nd else ()
        if any(axes[d] for d in drop):
            raise ShardingError(f"{op_label(name)}: a size-1 dim of {x.spec} is split over a mesh axis; reshard it "
                                f"to replicated first (meshpar.reshard(x, ...))")
        for d in reversed(drop):
            del axes[d]
        redo = lambda t: t.squeeze(drop) if drop else t.view_as(t)  # noqa: E731
    elif op in (aten.transpose_, aten.swapdims_, aten.swapaxes_, aten.t_):
        if op is aten.t_:
            d0, d1 = (0, 1) if nd == 2 else (0, 0)
        else:
            names = [a.name for a in func._schema.arguments]
            d0, d1 = kw[names[1]] % max(nd, 1), kw[names[2]] % max(nd, 1)
        if nd:
            axes[d0], axes[d1] = axes[d1], axes[d0]
        redo = lambda t: t.transpose(d0, d1) if t.ndim else t.view_as(t)  # noqa: E731
    else:
        raise ShardingError(f"{op_label(name)} reinterprets the storage of a ShardedTensor {x.spec}; meshpar "
                            f"cannot lay that out. Use meshpar.unshard(x) first, or an out-of-place op")
    local = redo(x._local)
    with torch.utils._mode_utils.no_dispatch():  # the wrapper's own sizes/strides, by the meta kernel
        meta = torch._C._meta_in_tls_dispatch_include()
        torch._C._set_meta_in_tls_dispatch_include(True)
        try:
            func(*args, **kwargs)
        finally:
            torch._C._set_meta_in_tls_dispatch_include(meta)
    spec = P.from_axes(axes, unreduced=x.spec.unreduced)
    check_output(local, spec, x.mesh, tuple(x.shape))
    x._local, x.spec, x._gshape, x._lay = local, spec, torch.Size(x.shape), None
    x._ent = None
    if not x._bg:  # a block-graph result's graph-connected block is redone by meshpar.sharding.dispatch
        x._lg = None
    if x._view is not None:  # a detached view: its value is now one more view step away from its root
        views.extend(x, redo)
    return x


def _choose_axes(sts, nd: int) -> list[tuple]:
    """Output dims' axes: first come, first served among the operands (broadcast-aligned)."""
    out: list[tuple] = [()] * nd
    used: set = set()
    for s in sts:
        off = nd - len(s._gshape)
        for d in range(len(s._gshape)):
            ax = s.spec.axes_of(d)
            if not ax or s._gshape[d] == 1 or out[off + d]:
                continue
            if used & set(ax):
                continue
            out[off + d] = ax
            used |= set(ax)
    return out


def _value_operands(args, kwargs) -> list:
    vals = [desc(a) for a in args]
    vals += [desc(v) for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    return [v for v in vals if v is not None]


def _pointwise(func, args, kwargs):
    name = func._schema.name
    flat, tree = tree_flatten((args, kwargs))
    sts = [a for a in flat if isinstance(a, ShardedTensor)]
    mesh = common_mesh(sts)
    shapes = [a._gshape if isinstance(a, ShardedTensor) else a.shape for a in flat if isinstance(a, torch.Tensor)]
    out_shape = tuple(torch.broadcast_shapes(*shapes))
    nd = len(out_shape)
    kind = _KIND.get(func, "no")
    keep = keep_partial("scale" if kind == "div" else kind, _value_operands(args, kwargs), kind == "div")
    mutated = _mutated(func)
    inplace = bool(mutated)
    if inplace:
        if mutated != (0,):  # an out= overload: the exact generic path writes ``out`` in its layout
            return _generic(func, args, kwargs)
        tgt = args[0]
        if not isinstance(tgt, ShardedTensor) or tuple(tgt._gshape) != out_shape or (
                tgt.spec.unreduced and tuple(tgt.spec.unreduced) != tuple(keep or ())):
            return _generic(func, args, kwargs)
        out_spec = tgt.spec
    else:
        out_spec = P.from_axes(_choose_axes(sts, nd), unreduced=keep or ())
    keep = out_spec.unreduced
    locs = [operand_block(a, out_spec, nd, mesh, keep, name) if isinstance(a, torch.Tensor) else a for a in flat]
    if not inplace and all(loc is a._local and a._view is None for a, loc in zip(flat, locs)
                           if isinstance(a, ShardedTensor)) and len(_FAST_ATEN) < 16384:
        key = fast_key(func, args, kwargs)  # None when a plain tensor takes part
        if key is not None:
            _FAST_ATEN[key] = _blockwise_exec(func, layout(out_spec, out_shape, mesh))
    largs, lkw = tree_unflatten(locs, tree)
    out = func(*largs, **lkw)
    if inplace:
        return args[0]
    return tree_map(lambda t: _wrap(t, out_spec, mesh, out_shape) if isinstance(t, torch.Tensor) else t, out)


def _blockwise_exec(func, lay):
    """Memoised below-autograd executor: ``func`` on the operands' blocks as they are, results laid out as ``lay``."""
    def ex(args, kwargs):
        largs = [a._local if type(a) is ShardedTensor else a for a in args]
        out = func(*largs, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            return new_sharded(out, lay)
        return tree_map(lambda t: new_sharded(t, lay) if isinstance(t, torch.Tensor) else t, out)
    return ex


def _copy(dst, src, kwargs):
    """``dst.copy_(src)`` with ``dst`` keeping its layout (a partial ``dst`` gets the value on index 0)."""
    name = "aten::copy_"
    if not isinstance(dst, ShardedTensor):
        dst.copy_(global_value(src, name), **kwargs)
        return dst
    nd = len(dst._gshape)
    if isinstance(src, ShardedTensor) and src.spec.unreduced and src.spec.unreduced == dst.spec.unreduced:
        blk = operand_block(src, dst.spec, nd, dst.mesh, dst.spec.unreduced, name)
    else:
        blk = operand_block(src, dst.spec.reduced(), nd, dst.mesh, (), name)
        if dst.spec.unreduced and dst.mesh.axis_index(dst.spec.unreduced) != 0:
            blk = torch.zeros_like(dst._local)
    dst._local.copy_(blk, **kwargs)
    return dst


def _generic(func, args, kwargs, random: bool = False):
    """Run ``func`` on global values; results replicated, mutated arguments written back in their layout."""
    name = func._schema.name
    flat, tree = tree_flatten((args, kwargs))
    sts = [a for a in flat if isinstance(a, ShardedTensor)]
    mesh = common_mesh(sts)
    x0 = args[0] if args else None
    view_op = _is_view_op(func)
    overwrite = random and func in _OVERWRITE and isinstance(x0, ShardedTensor)
    glob = []
    for a in flat:
        if isinstance(a, ShardedTensor):
            if overwrite and a is x0:
                glob.append(torch.empty(tuple(a._gshape), dtype=a.dtype, device=a._local.device))
            else:
                g = global_value(a, name)
                # the wrapper reports contiguous strides, and composite ops check them on the wrapper
                # (group_norm calls weight.contiguous(), a no-op there, and its kernel then reads the
                # storage as contiguous): the op sees a contiguous value, except a view op, which must
                # alias the block (strides do not change its values; a copy is a detached view, .views)
                if not g.is_contiguous() and a.is_contiguous() and (not view_op or func in _STRIDE_READERS):
                    g = g.contiguous()
                glob.append(g)
        else:
            glob.append(a)
    gargs, gkw = tree_unflatten(glob, tree)
    if random:
        dev = next((g.device for g in glob if isinstance(g, torch.Tensor)), torch.device("cpu"))
        with shared_rng(mesh, dev):
            out = func(*gargs, **gkw)
    else:
        try:
            out = func(*gargs, **gkw)
        except RuntimeError:
            # aten.view of a non-contiguous block that the wrapper reports contiguous: the dense op sees
            # a contiguous tensor, so run it on a contiguous copy (the result is then a detached view)
            if not any(isinstance(a, ShardedTensor) and a.is_contiguous() and not g.is_contiguous()
                       for a, g in zip(flat, glob)):
                raise
            glob = [g.contiguous() if isinstance(a, ShardedTensor) and a.is_contiguous() else g
                    for a, g in zip(flat, glob)]
            gargs, gkw = tree_unflatten(glob, tree)
            out = func(*gargs, **gkw)
    # write back the arguments the op mutated
    pos = {id(g): a for a, g in zip(flat, glob) if isinstance(a, ShardedTensor)}
    written = {}
    schema_args = func._schema.arguments
    for i in _mutated(func):
        an = schema_args[i].name
        a = args[i] if i < len(args) else kwargs.get(an)
        g = gargs[i] if i < len(gargs) else gkw.get(an)
        if isinstance(a, ShardedTensor):
            write_value(a, g)
            written[id(g)] = a
    del pos

    plain = {id(a) for a in flat if isinstance(a, torch.Tensor) and not isinstance(a, ShardedTensor)}

    def rewrap(t):
        if not isinstance(t, torch.Tensor):
            return t
        if id(t) in written:
            return written[id(t)]
        if id(t) in plain:  # an in-place or out= op on a plain tensor returns that tensor, as in dense torch
            return t
        if random and isinstance(x0, ShardedTensor) and tuple(t.shape) == tuple(x0._gshape):
            spec = x0.spec.reduced()  # the random value in the input's layout: no communication
            return _wrap(take_block(t, spec, mesh).contiguous(), spec, mesh, t.shape)
        return _wrap(t, P(), mesh, t.shape)
    res = tree_map(rewrap, out)
    if isinstance(x0, ShardedTensor) and view_op:
        # a view computed on a copy of x0's value: keep it coherent with x0 (in-place writes, reads)
        outs = res if isinstance(res, (list, tuple)) else (res,)
        for i, o in enumerate(outs):
            if isinstance(o, ShardedTensor) and o is not x0 and o._view is None and \
                    not views.shares_storage(o._local, x0._local):
                views.link(o, x0, views.view_step(func, args, kwargs, 0, i if isinstance(res, (list, tuple)) else None))
    return res


def _is_view_op(func) -> bool:
    """Whether ``func``'s result aliases an input without writing it (``slice``, ``diagonal``, ``split`` ...)."""
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


def _foreach(func, args, kwargs):
    name = func._schema.name
    lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
    n = len(lists[0])
    linear = name in _LINEAR_FOREACH
    for i in range(n):
        items = [lst[i] for lst in lists]
        sts = [t for t in items if isinstance(t, ShardedTensor)]
        ref = sts[0] if sts else None
        for t in items:
            if isinstance(t, ShardedTensor):
                if t.spec != ref.spec or t._gshape != ref._gshape or t.mesh != ref.mesh:
                    raise ShardingError(f"{op_label(name)}: element {i} mixes layouts {ref.spec} {tuple(ref._gshape)} "
                                        f"and {t.spec} {tuple(t._gshape)}; reshard them to one layout first")
                if t.spec.unreduced and not linear:
                    raise ShardingError(f"{op_label(name)} is not linear, so it cannot run on a partial sum "
                                        f"{t.spec}; reduce it first with meshpar.reshard(x, {t.spec.reduced()})")
            elif t.numel() != 1 or (ref is not None and ref.spec.unreduced):
                raise ShardingError(f"{op_label(name)}: element {i} mixes a ShardedTensor {ref.spec} with a plain "
                                    f"tensor of shape {tuple(t.shape)}; shard the plain tensor first")
        if ref is not None and ref.spec.unreduced and any(
                not isinstance(a, (list, tuple)) and isinstance(a, (int, float)) for a in args[1:]) and \
                name.startswith(("aten::_foreach_add", "aten::_foreach_sub")):
            raise ShardingError(f"{op_label(name)}: adding a number to a partial sum {ref.spec} would count it once "
                                "per rank; reduce first")

    def unwrap(a):
        return a._local if isinstance(a, ShardedTensor) else a
    largs = tree_map(unwrap, args)
    lkwargs = tree_map(unwrap, kwargs)
    out = func(*largs, **lkwargs)
    if name.endswith("_"):
        return None
    if isinstance(out, (list, tuple)):
        template = lists[0]
        res = []
        for i, t in enumerate(out):
            tpl = template[i]
            res.append(ShardedTensor(t, tpl.spec.reduced() if not linear else tpl.spec, tpl.mesh, tpl._gshape)
                       if isinstance(tpl, ShardedTensor) else t)
        return res
    return out
