"""Detached views: views that meshpar had to compute on a copy, kept coherent with their base.

A view op (``slice``, ``diagonal``, ``select``, ``unbind`` ...) on a ShardedTensor that reaches the
exact generic fallback runs on the base's *global value*. When that value is a gathered copy (the
base is split or a partial sum, or a block had to be made contiguous) the result does not share the
base's storage, although in dense torch it would, and a later in-place write into either one would
silently miss the other. Autograd formulas do exactly this (``grad.slice(...).mul_(2)`` in the
backward of ``fft.hfft``, ``ret.diagonal().fill_(1)`` in that of ``linalg.eig``).

Such a result is a *detached view*: it carries a :class:`ViewLink` (its root base and the steps that
take the root's global value to the view's), and every op that meets it, in
``__torch_function__`` or ``__torch_dispatch__``, goes through :func:`guard`:

* **refresh**: before the op reads the view, its block is recomputed from the root when the root's
  block changed since (its identity or its version counter: in-place ops bump the counter of the
  block they write, at the Python level by torch itself, below autograd by :mod:`.fallback`);
* **write-through**: after an op changed the view's block in place, the new value is stored into the
  root through the same steps (on the root's global value, then written back in the root's layout);
* results of the op that share the view's storage (a view of the view) are linked to the same root
  with one more step.

A detached view has a private, uninterned :class:`~.tensor.Layout` (``detached=True``): the memo fast
paths never serve it (they would skip all three) and nothing is memoised under it.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from torch.autograd.graph import increment_version

from ..errors import ShardingError
from .generic import global_value, value_block, write_value
from .tensor import Layout, ShardedTensor

Step = Callable[[torch.Tensor], torch.Tensor]


class ViewLink:
    """A detached view's root base, the steps from the root's global value to the view's global
    value, and the root block (object and version counter) the view was last made coherent with."""

    __slots__ = ("root", "steps", "seen_local", "seen_version")

    def __init__(self, root: ShardedTensor, steps: tuple[Step, ...]):
        self.root = root
        self.steps = steps
        self.seen_local = root._local
        self.seen_version = root._local._version

    def stale(self) -> bool:
        return self.root._local is not self.seen_local or self.root._local._version != self.seen_version


def view_step(func: Callable, args: Sequence, kwargs: dict, pos: int, index: int | None) -> Step:
    """The step ``g -> func(..., g at position pos, ...)[index]``: other ShardedTensor arguments
    enter as their global values at replay time."""
    args = tuple(args)
    kwargs = dict(kwargs)

    def step(g: torch.Tensor) -> torch.Tensor:
        a = [g if i == pos else (global_value(x) if isinstance(x, ShardedTensor) else x) for i, x in enumerate(args)]
        out = func(*a, **kwargs)
        return out[index] if index is not None else out
    return step


def link(out: ShardedTensor, base: ShardedTensor, step: Step) -> None:
    """Make ``out`` a detached view of ``base`` through ``step`` (of ``base``'s root when ``base`` is
    itself a detached view)."""
    if base._view is not None:
        root, steps = base._view.root, base._view.steps + (step,)
    else:
        root, steps = base, (step,)
    out._view = ViewLink(root, steps)
    relayout(out)


def extend(x: ShardedTensor, step: Step) -> None:
    """``x`` (a detached view) was changed in place by a metadata-only view op: one more step."""
    x._view = ViewLink(x._view.root, x._view.steps + (step,))
    relayout(x)


def relayout(x: ShardedTensor) -> None:
    """Give the detached view ``x`` its private layout (no memo serves it)."""
    x._lay = Layout(x.spec, x.mesh, x._gshape, detached=True)


def _root_value(root: ShardedTensor) -> torch.Tensor:
    g = global_value(root, "view of a sharded tensor")
    # the wrapper reports contiguous strides: replay the steps on what the view was first taken of
    if not g.is_contiguous() and root.is_contiguous():
        g = g.contiguous()
    return g


def _replay(ln: ViewLink, g: torch.Tensor) -> torch.Tensor:
    for st in ln.steps:
        g = st(g)
    return g


def refresh(x: ShardedTensor) -> None:
    """Recompute ``x``'s block from its root if the root changed since ``x`` last saw it."""
    ln = x._view
    if not ln.stale():
        return
    v = _replay(ln, _root_value(ln.root))
    with torch.no_grad():
        x._local.copy_(value_block(v, x.spec, x.mesh))
    x._view = ViewLink(ln.root, ln.steps)


def write_through(x: ShardedTensor) -> None:
    """Store ``x``'s (changed) value into its root, through the steps."""
    ln = x._view
    root = ln.root
    g = _root_value(root)
    v = _replay(ln, g)
    if v.numel() and v.untyped_storage().data_ptr() != g.untyped_storage().data_ptr():
        raise ShardingError(f"an in-place write into a view of a ShardedTensor {root.spec} cannot be replayed on its "
                            "base (a view step copied); write into the base, or unshard it first")
    with torch.no_grad():
        v.copy_(global_value(x, "view of a sharded tensor"))
    if g is not root._local:
        write_value(root, g)
    increment_version(root._local)  # other detached views of the root see the change
    x._view = ViewLink(root, ln.steps)


def _detached(args, kwargs) -> list[ShardedTensor]:
    out = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, ShardedTensor):
            if a._view is not None:
                out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(t for t in a if isinstance(t, ShardedTensor) and t._view is not None)
    return out


def shares_storage(t: torch.Tensor, local: torch.Tensor) -> bool:
    """Whether two plain tensors (both non-empty) share storage."""
    return (t.numel() > 0 and local.numel() > 0
            and t.untyped_storage().data_ptr() == local.untyped_storage().data_ptr())


class Guard:
    """What :func:`guard` watches in one call: the detached views among the operands, with their
    blocks and versions after the refresh."""

    __slots__ = ("views",)

    def __init__(self, views: list[ShardedTensor]):
        for v in views:
            refresh(v)
        self.views = [(v, v._local, v._local._version) for v in views]

    def done(self, func: Callable, args: Sequence, kwargs: dict, out):
        """After the call: write changed views through; link results that share a view's storage."""
        for v, loc, ver in self.views:
            if v._local is not loc or v._local._version != ver:  # (dispatch bumps versions: fallback.mark_written)
                write_through(v)
        if out is None:
            return out
        outs = out if isinstance(out, (list, tuple)) else (out,)
        inputs = {id(v) for v, _, _ in self.views}
        for i, o in enumerate(outs):
            if not isinstance(o, ShardedTensor) or id(o) in inputs or o._view is not None:
                continue
            for v, _, _ in self.views:
                if shares_storage(o._local, v._local):
                    pos = next((j for j, a in enumerate(args) if a is v), None)
                    if pos is None:
                        break
                    link(o, v, view_step(func, args, kwargs, pos, i if isinstance(out, (list, tuple)) else None))
                    break
        return out


def guard(args: Sequence, kwargs: dict) -> Guard | None:
    """A :class:`Guard` for a call whose operands include detached views, else None (the common case)."""
    views = _detached(args, kwargs)
    return Guard(views) if views else None
