"""Collectives addressed by mesh axis name (plain, non-differentiable, sync or async).

Every function takes ``(x, mesh, axes, ...)`` where ``axes`` is an axis name or a tuple of
names taken major to minor. A collective over axes whose size is 1 is a no-op. With
``async_op=True`` a :class:`Pending` is returned; ``.wait()`` gives the result.

All communication in meshpar goes through this module, which is what lets
:class:`~meshpar.mesh.counter.CommCounter` see it and lets a timeout name its op and axis.
"""
from __future__ import annotations

import contextlib
import functools
import contextvars
from datetime import timedelta
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from ..errors import CollectiveTimeout, ShardingError
from .counter import record
from .mesh import Mesh, normalize_axes

# torch >= 2.12 renamed the tensor forms; the GPU machine has 2.11.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

_CURRENT_OP: contextvars.ContextVar[str] = contextvars.ContextVar("meshpar_current_op", default="<user code>")


@contextlib.contextmanager
def op_name(name: str):
    """Name the op on whose behalf collectives run, for timeout messages."""
    tok = _CURRENT_OP.set(name)
    try:
        yield
    finally:
        _CURRENT_OP.reset(tok)


class Pending:
    """An in-flight collective. ``wait()`` blocks (with the mesh timeout) and returns the result."""

    def __init__(self, work, finish: Callable[[], torch.Tensor], what: str, axes, mesh: Mesh):
        self._work = work
        self._finish = finish
        self._what, self._axes, self._mesh = what, axes, mesh
        self._result: torch.Tensor | None = None

    def wait(self) -> torch.Tensor:
        if self._result is None:
            _wait(self._work, self._what, self._axes, self._mesh)
            self._result = self._finish()
        return self._result


class _Done:
    def __init__(self, t: torch.Tensor):
        self._t = t

    def wait(self) -> torch.Tensor:
        return self._t


# dtypes gloo cannot communicate ("Invalid scalar type"), and the exact wider dtype they travel as
_GLOO_WIDEN = {torch.int16: torch.int32, torch.uint16: torch.int32, torch.uint32: torch.int64}
_GLOO_NEVER = frozenset({torch.uint64})


class _Narrow:
    """A pending collective on a widened tensor: ``wait()`` casts the result back (into ``into`` if given)."""

    def __init__(self, pending, dtype: torch.dtype, into: torch.Tensor | None = None):
        self._p, self._dtype, self._into = pending, dtype, into

    def wait(self) -> torch.Tensor:
        out = self._p.wait().to(self._dtype)
        if self._into is not None:
            self._into.copy_(out)
            return self._into
        return out


def _widened(fn):
    """Run collective ``fn(x, mesh, ...)`` on gloo for dtypes gloo lacks by widening ``x`` exactly
    (int16 -> int32 ...) and casting the result back. The check depends only on the dtype, which is
    the same on every rank, so an unsupported dtype raises on every rank before any communication."""
    @functools.wraps(fn)
    def run(x: torch.Tensor, mesh: Mesh, *args, **kwargs):
        if getattr(mesh, "backend", None) == "gloo" and isinstance(x, torch.Tensor):
            if x.dtype in _GLOO_NEVER:
                raise ShardingError(f"{fn.__name__}: dtype {x.dtype} cannot be communicated over gloo; "
                                    "cast it to torch.int64 first")
            wide = _GLOO_WIDEN.get(x.dtype)
            if wide is not None:
                into = x if kwargs.get("inplace") else None
                kwargs = {k: v for k, v in kwargs.items() if k != "inplace"}
                async_op = kwargs.pop("async_op", False)
                res = _Narrow(fn(x.to(wide), mesh, *args, async_op=True, **kwargs), x.dtype, into)
                return res if async_op else res.wait()
        return fn(x, mesh, *args, **kwargs)
    return run


def _materialized(x: torch.Tensor) -> torch.Tensor:
    """``x`` with lazy conjugate/negative view bits resolved and an efficient zero tensor made real.

    Communication reads and writes raw storage: a ``x.conj()`` view would travel unconjugated (and
    a zero tensor has no storage), so every collective sends this instead. No copy for a plain tensor."""
    if x.is_conj() or x.is_neg():
        return x.resolve_conj().resolve_neg()
    if x._is_zerotensor():
        return torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    return x


def _gloo_check(x: torch.Tensor, mesh: Mesh, what: str) -> None:
    """Refuse (on every rank, before communicating) a dtype gloo cannot send point to point."""
    if getattr(mesh, "backend", None) == "gloo" and (x.dtype in _GLOO_NEVER or x.dtype in _GLOO_WIDEN):
        raise ShardingError(f"{what}: dtype {x.dtype} cannot be communicated over gloo; cast it to "
                            f"{_GLOO_WIDEN.get(x.dtype, torch.int64)} first")


def _wait(work, what: str, axes, mesh: Mesh) -> None:
    if work is None:
        return
    works = work if isinstance(work, (list, tuple)) else [work]
    for w in works:
        try:
            if mesh.backend == "gloo":
                w.wait(timedelta(seconds=mesh.timeout_s))
            else:
                w.wait()
        except RuntimeError as e:
            raise CollectiveTimeout(
                f"collective {what} over mesh axis {axes} failed or timed out after {mesh.timeout_s:.0f}s "
                f"in op {_CURRENT_OP.get()!r} on world rank {mesh.world_rank}: {e}. "
                "A peer rank probably raised an error or skipped this collective."
            ) from e


def _run(work_fn, finish, what, axes, mesh, async_op):
    work = work_fn()
    p = Pending(work, finish, what, axes, mesh)
    return p if async_op else p.wait()


def _trivial(mesh: Mesh, axes) -> bool:
    return mesh.size(axes) == 1


@_widened
def all_reduce(x: torch.Tensor, mesh: Mesh, axes, op: str = "sum", *, async_op: bool = False,
               inplace: bool = False):
    """Sum (or max/min) of ``x`` over ``axes``; returns a new tensor on every member.

    ``inplace=True`` reduces into ``x`` itself when it is contiguous (no copy; ``x`` is returned),
    for callers that own a scratch buffer such as a gradient bucket."""
    axes = mesh.check_axes(axes)
    if _trivial(mesh, axes):
        if inplace:
            return _Done(x) if async_op else x
        return _Done(x.clone()) if async_op else x.clone()
    n = mesh.size(axes)
    record("all_reduce", axes, 2 * (n - 1) / n * x.numel() * x.element_size())
    src = _materialized(x)
    if src is not x and inplace:  # reduce a resolved copy, then store it through x's view bits
        red = all_reduce(src, mesh, axes, op, async_op=async_op)
        return _Narrow(red, x.dtype, x) if async_op else x.copy_(red)
    out = x.detach() if inplace and x.is_contiguous() else src.detach().clone(memory_format=torch.contiguous_format)
    red = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
    return _run(lambda: dist.all_reduce(out, red, group=mesh.group(axes), async_op=True),
                lambda: out, f"all_reduce({op})", axes, mesh, async_op)


@_widened
def all_gather(x: torch.Tensor, mesh: Mesh, axes, dim: int = 0, *, async_op: bool = False):
    """Concatenate the members' ``x`` along ``dim``, ordered major to minor over ``axes``."""
    axes = mesh.check_axes(axes)
    if _trivial(mesh, axes):
        return _Done(x.clone()) if async_op else x.clone()
    n = mesh.size(axes)
    dim = dim % x.ndim
    record("all_gather", axes, (n - 1) * x.numel() * x.element_size())
    src = _materialized(x).detach().contiguous()
    flat = torch.empty(n * src.numel(), dtype=src.dtype, device=src.device)
    order = mesh.group_index_order(axes)

    def finish():
        if dim == 0 and order == list(range(n)):  # blocks already in place: a view, no copy
            return flat.view((n * src.shape[0],) + tuple(src.shape[1:]))
        buf = flat.view((n,) + tuple(src.shape))
        parts = buf[order] if order != list(range(n)) else buf
        return torch.cat(list(parts.unbind(0)), dim=dim)

    return _run(lambda: _ALL_GATHER(flat, src.view(-1), group=mesh.group(axes), async_op=True),
                finish, "all_gather", axes, mesh, async_op)


@_widened
def reduce_scatter(x: torch.Tensor, mesh: Mesh, axes, dim: int = 0, *, async_op: bool = False):
    """Sum ``x`` over ``axes`` and keep this member's chunk of ``dim`` (chunk order major to minor)."""
    axes = mesh.check_axes(axes)
    if _trivial(mesh, axes):
        return _Done(x.clone()) if async_op else x.clone()
    n = mesh.size(axes)
    dim = dim % x.ndim
    if x.shape[dim] % n:
        raise ShardingError(f"reduce_scatter over {axes}: dim {dim} has size {x.shape[dim]}, "
                            f"not divisible by the axis size {n}; pad it to a multiple of {n}")
    record("reduce_scatter", axes, (n - 1) / n * x.numel() * x.element_size())
    x = _materialized(x)
    chunks = x.detach().chunk(n, dim=dim)
    order = mesh.group_index_order(axes)
    if dim == 0 and order == list(range(n)) and x.is_contiguous():  # chunks already in group order: no copy
        src = x.detach().view(-1)
        out = torch.empty(chunks[0].shape, dtype=x.dtype, device=x.device)
        return _run(lambda: _REDUCE_SCATTER(out.view(-1), src, group=mesh.group(axes), async_op=True),
                    lambda: out, "reduce_scatter", axes, mesh, async_op)
    # group rank g must receive the chunk of the position p with order[p] == g
    by_group = [None] * n
    for p, g in enumerate(order):
        by_group[g] = chunks[p]
    src = torch.cat([c.reshape(-1) for c in by_group])
    out = torch.empty(by_group[0].shape, dtype=x.dtype, device=x.device)
    return _run(lambda: _REDUCE_SCATTER(out.view(-1), src, group=mesh.group(axes), async_op=True),
                lambda: out, "reduce_scatter", axes, mesh, async_op)


@_widened
def all_to_all(x: torch.Tensor, mesh: Mesh, axes, split_dim: int, concat_dim: int, *, async_op: bool = False):
    """Split ``x`` along ``split_dim`` into n chunks, send chunk p to member p, concatenate what
    arrives along ``concat_dim`` (ordered by sender, major to minor over ``axes``)."""
    axes = mesh.check_axes(axes)
    if _trivial(mesh, axes):
        return _Done(x.clone()) if async_op else x.clone()
    n = mesh.size(axes)
    split_dim, concat_dim = split_dim % x.ndim, concat_dim % x.ndim
    if x.shape[split_dim] % n:
        raise ShardingError(f"all_to_all over {axes}: split dim {split_dim} has size {x.shape[split_dim]}, "
                            f"not divisible by the axis size {n}; pad it to a multiple of {n}")
    record("all_to_all", axes, (n - 1) / n * x.numel() * x.element_size())
    x = _materialized(x)
    order = mesh.group_index_order(axes)
    chunks = x.detach().chunk(n, dim=split_dim)
    by_group = [None] * n
    for p, g in enumerate(order):
        by_group[g] = chunks[p]
    src = torch.stack([c.contiguous() for c in by_group]).contiguous()
    buf = torch.empty_like(src)

    def finish():
        parts = buf[order] if order != list(range(n)) else buf
        return torch.cat(list(parts.unbind(0)), dim=concat_dim)

    return _run(lambda: dist.all_to_all_single(buf, src, group=mesh.group(axes), async_op=True),
                finish, "all_to_all", axes, mesh, async_op)


def broadcast(x: torch.Tensor, mesh: Mesh, axes, src: int, *, async_op: bool = False, out: torch.Tensor | None = None):
    """Every member gets the ``x`` of the member at linear index ``src`` (major to minor over ``axes``).

    Non-source members may pass a preallocated ``out`` (its contents are overwritten); ``x`` is
    read only on the source.
    """
    axes = mesh.check_axes(axes)
    if _trivial(mesh, axes):
        return _Done(x) if async_op else x
    _gloo_check(x, mesh, "broadcast")
    me = mesh.axis_index(axes)
    nbytes = x.numel() * x.element_size()
    record("broadcast", axes, 0.0 if me == src else float(nbytes))
    buf = _materialized(x).detach().contiguous() if me == src else (out if out is not None else torch.empty_like(x, memory_format=torch.contiguous_format))
    g = mesh.group(axes)
    root = dist.get_global_rank(g, mesh.group_rank_of(axes, src)) if g is not dist.group.WORLD else mesh.group_rank_of(axes, src)
    return _run(lambda: dist.broadcast(buf, root, group=g, async_op=True), lambda: buf,
                "broadcast", axes, mesh, async_op)


@_widened
def ppermute(x: torch.Tensor, mesh: Mesh, axis, perm: Sequence[tuple[int, int]], *, async_op: bool = False):
    """Send ``x`` from member ``s`` to member ``d`` for each ``(s, d)`` in ``perm`` (indices along ``axis``).

    A member that receives nothing gets zeros. Each source and destination appears at most once.
    """
    axes = mesh.check_axes(axis)
    n = mesh.size(axes)
    me = mesh.axis_index(axes)
    srcs = [s for s, _ in perm]
    dsts = [d for _, d in perm]
    if len(set(srcs)) != len(srcs) or len(set(dsts)) != len(dsts):
        raise ValueError(f"ppermute perm {perm} repeats a source or destination")
    x = _materialized(x).detach().contiguous()
    out = torch.zeros_like(x)
    if n == 1:
        for s, d in perm:
            if s == d == 0:
                out = x.clone()
        return _Done(out) if async_op else out
    g = mesh.group(axes)

    def glob(i):
        gr = mesh.group_rank_of(axes, i)
        return gr if g is dist.group.WORLD else dist.get_global_rank(g, gr)

    ops = []
    for s, d in perm:
        if s == me and d == me:
            out.copy_(x)
        elif s == me:
            ops.append(dist.P2POp(dist.isend, x, glob(d), group=g))
        elif d == me:
            ops.append(dist.P2POp(dist.irecv, out, glob(s), group=g))
            record("ppermute", axes, float(x.numel() * x.element_size()))
    works = dist.batch_isend_irecv(ops) if ops else None
    return _run(lambda: works, lambda: out, "ppermute", axes, mesh, async_op)


def send(x: torch.Tensor, mesh: Mesh, axis, dst: int, *, async_op: bool = False):
    """Point-to-point send to member ``dst`` along ``axis``."""
    axes = mesh.check_axes(axis)
    _gloo_check(x, mesh, "send")
    g = mesh.group(axes)
    gr = mesh.group_rank_of(axes, dst)
    peer = gr if g is dist.group.WORLD else dist.get_global_rank(g, gr)
    x = _materialized(x).detach().contiguous()
    return _run(lambda: dist.isend(x, peer, group=g), lambda: x, "send", axes, mesh, async_op)


def recv(buf: torch.Tensor, mesh: Mesh, axis, src: int, *, async_op: bool = False):
    """Point-to-point receive into ``buf`` from member ``src`` along ``axis``."""
    axes = mesh.check_axes(axis)
    _gloo_check(buf, mesh, "recv")
    g = mesh.group(axes)
    gr = mesh.group_rank_of(axes, src)
    peer = gr if g is dist.group.WORLD else dist.get_global_rank(g, gr)
    record("recv", axes, float(buf.numel() * buf.element_size()))
    return _run(lambda: dist.irecv(buf, peer, group=g), lambda: buf, "recv", axes, mesh, async_op)


def barrier(mesh: Mesh, axes=None) -> None:
    """Synchronize the members of ``axes`` (all mesh axes when None)."""
    axes = normalize_axes(axes) or mesh.names
    t = torch.zeros(1, device=mesh.device)
    all_reduce(t, mesh, axes)
