"""Autograd glue between ShardedTensors and the local blocks that op rules compute on.

Rules follow one pattern::

    a_local = enter(a, vary=...)          # plain tensor in the autograd graph
    out_local = <local math + collectives>
    return wrap(out_local, out_spec, mesh, out_shape)

Gradient convention (see :mod:`meshpar.mesh.autograd`): a value's gradient has the value's
layout, fully reduced. ``vary`` lists the axes over which the rule's per-rank results differ
while ``a`` is replicated; the block's gradient is summed over them in backward. A parameter
may defer that sum over some axes by carrying ``_meshpar_defer_reduce = ("data",)``; its
gradient then arrives *unreduced* over those axes (``grad.spec.unreduced``), for a
data-parallel reducer to sum in buckets.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from ..mesh import Mesh, collectives as C
from .semantics import check_output, implicit
from .spec import P, base_axis, is_zigzag
from .tensor import ShardedTensor, layout, new_block_graph, new_sharded
from .views import refresh

_DisableTF = torch._C.DisableTorchFunctionSubclass


class _Enter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: ShardedTensor, vary: tuple[str, ...]):
        defer = tuple(getattr(x, "_meshpar_defer_reduce", ()) or ())
        ctx.spec, ctx.mesh, ctx.shape = x.spec, x.mesh, x._gshape
        ctx.sum_axes = tuple(a for a in vary if a not in defer)
        ctx.unreduced = tuple(a for a in vary if a in defer)
        return x._local.view_as(x._local)

    @staticmethod
    def backward(ctx, g):
        if g is None:
            return None, None
        if ctx.sum_axes:
            g = C.all_reduce(g, ctx.mesh, ctx.sum_axes)
        spec = ctx.spec.reduced().with_unreduced(ctx.unreduced) if ctx.unreduced else ctx.spec.reduced()
        return ShardedTensor(g, spec, ctx.mesh, ctx.shape), None


class _Wrap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: torch.Tensor, spec: P, mesh: Mesh, shape: tuple[int, ...]):
        ctx.spec, ctx.mesh, ctx.shape = spec, mesh, shape
        return ShardedTensor(local.detach(), spec, mesh, shape)

    @staticmethod
    def backward(ctx, g):
        return grad_block(g, ctx.spec, ctx.mesh, ctx.shape), None, None, None


def grad_block(g, spec: P, mesh: Mesh, shape) -> torch.Tensor:
    """The local block, in layout ``spec`` (reduced), of a gradient given as a ShardedTensor or a global tensor."""
    if isinstance(g, ShardedTensor):
        if g.spec.entries != spec.entries or g.spec.unreduced:
            from .reshard import reshard_local
            return reshard_local(g._local, g.spec, P(*spec.entries), mesh, g._gshape)
        return g._local
    from .layout import take_block
    return take_block(g, P(*spec.entries), mesh)


def enter(x: ShardedTensor, vary: Iterable[str] = ()) -> torch.Tensor:
    """``x``'s block as a plain tensor in the autograd graph; backward sums its gradient over ``vary``.

    No autograd node for a block-graph result of :func:`wrap` (its block is in the graph: the block
    itself, or a ``pvary`` of it over ``vary``). At most one node per op otherwise: a graph-connected
    wrapper made by :func:`materialize` keeps its graph-connected block (``_lg``), which the next op
    uses directly (no node) while the wrapper's ``grad_fn`` is still the one ``materialize`` made (an
    in-place op replaces it), its storage is the same, and nobody watches the wrapper's own gradient
    (hooks, ``retain_grad``); a leaf keeps its entered block per ``vary`` (the node saves no tensors,
    so it serves every forward) until its block is updated in place.
    """
    if type(vary) is not tuple:
        vary = tuple(vary)
    if x._view is not None:  # a detached view (.views): bring its block up to date with its base first
        refresh(x)
    if x._bg:  # a block-graph result: its block is in the graph already
        if vary and torch.is_grad_enabled():
            vary = _live(vary, x.mesh)
            if vary:
                from ..mesh.autograd import pvary
                return pvary(x._lg, x.mesh, vary)
        return x._lg
    if not torch.is_grad_enabled():
        return x._local
    # a leaf's entered blocks by vary: the entered block is a view of ``_local``, valid while the block object,
    # its version (an in-place update, an optimizer step), its data (``.data =``, as ZeRO-3 regathers) and the
    # gradient deferral are the same
    ents = x._ent
    if ents is not None:
        ent = ents.get(vary)
        if ent is not None:
            loc = x._local
            if ent[0] is loc and ent[1] == loc._version and ent[2] == loc.data_ptr() \
                    and ent[3] == getattr(x, "_meshpar_defer_reduce", None):
                return ent[4]
    key_vary = vary
    with _DisableTF():  # the autograd attributes as torch keeps them, without a trip through __torch_function__
        if not x.requires_grad:
            return x._local
        vary = _live(vary, x.mesh) if vary else ()
        loc = x._local
        gf = x.grad_fn
        if not vary:
            lg = x._lg
            if lg is not None and gf is x._lgv and loc.data_ptr() == lg.data_ptr() \
                    and not x._backward_hooks and not x.retains_grad:
                return lg
        if gf is None:  # a leaf
            # the entered block is a view of ``_local``: an in-place update (an optimizer step) bumps its
            # version and invalidates it, as does a new block object
            out = _Enter.apply(x, vary)
            if ents is None or len(ents) > 8:
                ents = x._ent = {}
            ents[key_vary] = (loc, loc._version, loc.data_ptr(), getattr(x, "_meshpar_defer_reduce", None), out)
            return out
        return _Enter.apply(x, vary)


def _live(vary: tuple, mesh: Mesh) -> tuple:
    """The axes of ``vary`` with more than one rank (a gradient sum over the others is the identity)."""
    return tuple(a for a in vary if mesh.size(a) > 1)


def wrap(local: torch.Tensor, spec: P, mesh: Mesh, shape: Sequence[int]) -> ShardedTensor:
    """A ShardedTensor around ``local`` (this rank's block), connected to ``local``'s autograd graph
    (a block-graph result, :func:`meshpar.sharding.tensor.new_block_graph`, when ``local`` requires grad)."""
    shape = tuple(int(s) for s in shape)
    check_output(local, spec, mesh, shape)
    if torch.is_grad_enabled() and local.requires_grad:
        return new_block_graph(local, layout(spec, shape, mesh))
    return ShardedTensor(local, spec, mesh, shape)


def materialize(x: ShardedTensor, clone: bool = False) -> ShardedTensor:
    """``x`` as a wrapper that carries the autograd graph itself (one ``_Wrap`` node on its block), for
    code that records autograd on the wrapper: the exact aten fallback, ``torch.autograd.Function``.
    A block-graph result becomes such a wrapper; any other tensor is returned as it is. ``clone``
    gives the wrapper a copy of the block (for an in-place op that must not write ``x`` yet)."""
    if not x._bg or not torch.is_grad_enabled():
        return x
    loc = x._lg.clone() if clone else x._lg
    out = _Wrap.apply(loc, x.spec, x.mesh, tuple(x._gshape))
    out._lg = loc
    out._lgv = out.grad_fn  # an in-place op recorded on the wrapper replaces it: _lg is then stale
    return out


def tracked(x):
    """``x`` (a ShardedTensor) as a tensor whose autograd graph is recorded on the wrapper itself.

    Under autograd, meshpar keeps each result's graph on its block (no autograd node per op). Code that
    meshpar's dispatcher does not see, ``torch.autograd.Function.apply`` and reentrant checkpointing,
    records autograd on the tensors it is given; pass it ``meshpar.tracked(x)``. Without it, the
    backward raises instead of losing the gradient. Anything else is returned unchanged."""
    return materialize(x) if isinstance(x, ShardedTensor) else x


class _SliceBlock(torch.autograd.Function):
    """Keep block ``index`` of ``dim`` (free); backward all-gathers the gradient over ``axes``."""

    @staticmethod
    def forward(ctx, x, mesh, axes, dim):
        ctx.mesh, ctx.axes, ctx.dim = mesh, axes, dim
        n = mesh.size(axes)
        return x.chunk(n, dim=dim)[mesh.axis_index(axes)].contiguous()

    @staticmethod
    def backward(ctx, g):
        return C.all_gather(g, ctx.mesh, ctx.axes, ctx.dim), None, None, None


def slice_block(x: torch.Tensor, mesh: Mesh, axes: tuple[str, ...], dim: int) -> torch.Tensor:
    """Replicated -> sharded over ``axes`` on ``dim`` as a free local slice (autograd-aware; zigzag-aware)."""
    if not axes or mesh.size(axes) == 1:
        return x
    if is_zigzag(tuple(axes)):
        from .zigzag import zigzag_slice
        return zigzag_slice(x, mesh, tuple(axes), dim)
    if torch.is_grad_enabled() and x.requires_grad:
        return _SliceBlock.apply(x, mesh, tuple(axes), dim)
    n = mesh.size(axes)
    return x.chunk(n, dim=dim)[mesh.axis_index(axes)]


def reduce_unreduced(x: ShardedTensor) -> ShardedTensor:
    """Sum an unreduced (partial) tensor over its unreduced axes: the lazy reduction happens here."""
    if not x.spec.unreduced:
        return x
    implicit("reduce", f"sum the partial sum {x.spec} over {x.spec.unreduced}", x.mesh)
    from ..mesh.autograd import psum
    local = psum(enter(x), x.mesh, x.spec.unreduced)
    return wrap(local, x.spec.reduced(), x.mesh, x._gshape)


@dataclass(frozen=True)
class OperandPlan:
    """How one operand reaches a rule's layout: sum its gradient over ``vary``, then slice ``slices``."""
    vary: tuple[str, ...]
    slices: tuple[tuple[int, tuple[str, ...]], ...]


def meta(x):
    """A hashable description of an operand's layout (None for non-tensors)."""
    if isinstance(x, ShardedTensor):
        return ("S", x.spec, tuple(x._gshape))
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape))
    return None


@functools.lru_cache(maxsize=4096)
def operand_plan(m, out_spec: P, out_ndim: int, used: frozenset | None = None) -> OperandPlan | None:
    """Plan for an operand described by ``meta`` ``m`` feeding a result laid out as ``out_spec``.

    ``m`` is right-aligned to ``out_ndim`` dims (broadcasting). Where the output is split over
    axes that the operand is replicated over: a real dimension is sliced (free), a broadcast one
    makes the operand vary (its gradient is summed). ``used`` (default: the axes ``out_spec``
    splits or leaves unreduced) are the axes over which the per-rank results differ.
    """
    if m is None:
        return None
    used = set(out_spec.used_axes()) if used is None else set(used)
    if m[0] == "S":
        xspec, shape = m[1], m[2]
        have = set(xspec.used_axes())
    else:
        xspec, shape, have = P(), m[1], set()
    xdim = len(shape)
    off = out_ndim - xdim
    slices = []
    sliced: set[str] = set()
    for d in range(xdim):
        oax = out_spec.axes_of(off + d)
        if not oax or shape[d] == 1:
            continue
        xax = xspec.axes_of(d)
        if xax == oax:
            continue
        if xax and oax[: len(xax)] == xax:
            extra = oax[len(xax):]
        elif not xax:
            extra = oax
        else:
            from ..errors import ShardingError
            raise ShardingError(f"operand spec {xspec} dim {d} is split over {xax} but the result needs {oax}; "
                                f"reshard the operand to match")
        slices.append((d, tuple(extra)))
        sliced |= {base_axis(a) for a in extra}
    return OperandPlan(tuple(sorted(used - have - sliced)), tuple(slices))


def apply_plan(x, plan: OperandPlan | None, mesh: Mesh):
    """The operand's block per ``plan`` (autograd-aware)."""
    if plan is None:
        return x
    if isinstance(x, ShardedTensor):
        loc = enter(x, plan.vary)
    else:
        loc = x
        if plan.vary and torch.is_grad_enabled() and x.requires_grad:
            from ..mesh.autograd import pvary
            loc = pvary(loc, mesh, plan.vary)
    for d, extra in plan.slices:
        loc = slice_block(loc, mesh, extra, d)
    return loc


def local_in(x, out_spec: P, out_ndim: int, mesh: Mesh, used: Iterable[str] | None = None) -> torch.Tensor:
    """The block of operand ``x`` (ShardedTensor, plain tensor or scalar) that a computation producing
    ``out_spec`` needs, with the right backward (see :func:`operand_plan`)."""
    if not isinstance(x, torch.Tensor):
        return x
    return apply_plan(x, operand_plan(meta(x), out_spec, out_ndim, None if used is None else frozenset(used)), mesh)


def _block(a: ShardedTensor) -> torch.Tensor:
    """A ShardedTensor operand's graph-connected block (no vary, no slices)."""
    return a._lg if a._bg else enter(a)


def grad_executor(func, plans, out_spec: P, out_shape, mesh: Mesh):
    """The grad-mode memo executor ``run(args, kwargs)`` of a planned blockwise call (no keywords, no
    reduction): operands enter autograd per their plans (free slices, gradient sums over broadcast axes),
    ``func`` runs on the blocks, and the result is a block-graph result (no autograd node of its own).

    Memo keys hold a layout for every tensor operand, so every operand with a plan is a ShardedTensor;
    calls whose operands need neither slices nor gradient sums (the common case) take a shorter path."""
    lay = layout(out_spec, out_shape, mesh)
    plain = all(p is None or (not p.vary and not p.slices) for p in plans)
    tensors = tuple(p is not None for p in plans)

    def finish(out: torch.Tensor) -> ShardedTensor:
        return new_block_graph(out, lay) if out.requires_grad else new_sharded(out, lay)

    if plain and tensors == (True,):
        def run(args, kw):
            return finish(func(_block(args[0])))
    elif plain and tensors == (True, True):
        def run(args, kw):
            return finish(func(_block(args[0]), _block(args[1])))
    elif plain:
        def run(args, kw):
            return finish(func(*[_block(a) if t else a for a, t in zip(args, tensors)]))
    elif not any(p is not None and p.slices for p in plans):  # gradient sums over broadcast axes only
        varies = tuple(None if p is None else p.vary for p in plans)

        def run(args, kw):
            return finish(func(*[a if v is None else enter(a, v) for a, v in zip(args, varies)]))
    else:
        def run(args, kw):
            return finish(func(*[a if p is None else apply_plan(a, p, mesh) for a, p in zip(args, plans)]))
    return run
