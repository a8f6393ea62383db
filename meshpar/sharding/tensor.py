"""ShardedTensor: a ``torch.Tensor`` subclass holding this rank's block of a global tensor.

``.shape``/``.size()``/``.ndim`` report the **global** shape (as JAX and DTensor do); ``.spec``
and ``.mesh`` say how it is laid out; ``._local`` is the raw block and ``.local`` the block
connected to autograd.

Two entry points route torch calls:

* ``__torch_function__`` (Python level) goes to the rule registry in
  :mod:`meshpar.sharding.dispatch`: each rule picks the distributed algorithm and the output
  spec. This is where every op with communication lives.
* ``__torch_dispatch__`` (below autograd) only serves calls torch makes internally on the
  wrapper — the autograd engine seeding ``ones_like``, accumulating ``.grad``, optimizers'
  in-place updates — and only for *local-equivalent* ops: ops that act blockwise on operands
  of identical layout. Anything else raises a ShardingError naming the op and the specs.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..mesh import Mesh
from .spec import P

_mws = torch.Tensor._make_wrapper_subclass
_STRIDED = torch.strided
_grad_enabled = torch.is_grad_enabled
_set_conj = torch._C._set_conj
_set_neg = torch._C._set_neg


def mirror_math_bits(wrapper: torch.Tensor, local: torch.Tensor) -> None:
    """Give ``wrapper`` the conjugate and negative view bits of its block ``local``.

    A block may be a lazy view (``x.conj()``, ``torch._neg_view``): its values are the storage's
    conjugated/negated, and torch's Conjugate/Negative dispatch keys resolve it before kernels that
    do not read the bit themselves. Inside ``__torch_dispatch__`` those keys are excluded, so a
    kernel run there on such a block reads the raw storage: a silent wrong answer (``sub`` of two
    conjugate views gave the conjugate of the difference; pytorch/pytorch#130646). With the bits on
    the wrapper, torch resolves them at the wrapper's own dispatch, before the call reaches
    meshpar, exactly as for a dense tensor (as torch's CompositeCompliantTensor does). Every
    ShardedTensor constructor and memoised executor calls this when the block has a bit.
    """
    if local.is_conj():
        _set_conj(wrapper, True)
    if local.is_neg():
        _set_neg(wrapper, True)


class Layout:
    """The interned (spec, global shape, mesh) of a ShardedTensor: the no-grad memo's key.

    One object per distinct (spec, global shape) on a mesh (see :func:`layout`), so the
    dispatcher keys its memo on the layout's identity (a C-level hash) instead of hashing the
    spec, the shape and the mesh on every call. Immutable by convention; ``shape`` is the
    global shape as a plain tuple for ``_make_wrapper_subclass``.
    """

    __slots__ = ("spec", "mesh", "gshape", "shape", "detached", "sentinel")

    def __init__(self, spec: P, mesh: Mesh, gshape: torch.Size, detached: bool = False):
        self.spec = spec
        self.mesh = mesh
        self.gshape = gshape
        self.shape = tuple(gshape)
        # True for the private, uninterned layout of a detached view (see meshpar.sharding.views): no memo
        # entry is ever stored under it, so calls on such a tensor always take the slow, coherent path
        self.detached = detached
        self.sentinel = None  # (dtype, device, tensor): the last gradient sentinel of block-graph results (grad_sentinel)

    def __repr__(self) -> str:
        return f"Layout({self.spec}, {tuple(self.gshape)}, {self.mesh})"

    def __copy__(self) -> "Layout":
        return self  # an interned value: a copy of a tensor keeps its layout (and the mesh it lives on)

    def __deepcopy__(self, memo) -> "Layout":
        return self


_LAYOUT_LIMIT = 1 << 16


def layout(spec: P, shape: Sequence[int], mesh: Mesh) -> Layout:
    """The interned :class:`Layout` of (spec, shape) on ``mesh``.

    The intern table is a per-mesh cache (``mesh._layouts``, keyed by value: spec and global
    shape), bounded at 65536 entries; past that (or for a mesh object without the table) a
    fresh, uninterned Layout is returned, which is still correct: the memo then simply misses.
    """
    gshape = shape if type(shape) is torch.Size else torch.Size(shape)
    table = getattr(mesh, "_layouts", None)
    if table is None:
        return Layout(spec, mesh, gshape)
    key = (spec, gshape)
    lay = table.get(key)
    if lay is None:
        lay = Layout(spec, mesh, gshape)
        if len(table) < _LAYOUT_LIMIT:
            table[key] = lay
    return lay


def layout_of(x: "ShardedTensor") -> Layout:
    """``x``'s interned layout (computed on first use and kept on the tensor)."""
    lay = x._lay
    if lay is None:
        lay = x._lay = layout(x.spec, x._gshape, x.mesh)
    return lay


def new_sharded(local: torch.Tensor, lay: Layout) -> "ShardedTensor":
    """A ShardedTensor around ``local`` laid out as ``lay`` (no autograd link: ``requires_grad`` False).

    The fast constructor of the no-grad executors: no ``__new__``/``__init__`` round trip,
    positional ``_make_wrapper_subclass`` arguments.
    """
    r = _mws(ShardedTensor, lay.shape, None, None, None, local.dtype, _STRIDED, local.device)
    r._local = local
    r._lay = lay
    r.spec = lay.spec
    r.mesh = lay.mesh
    r._gshape = lay.gshape
    if local.is_conj() or local.is_neg():
        mirror_math_bits(r, local)
    return r


# ---------------------------------------------------------------------------- block-graph results
# Under autograd an op's result keeps its autograd graph on its *block*: ``_lg`` is the
# graph-connected block (``_local`` is, as always, the same block detached), and the wrapper records
# no node at all (``_bg`` True). The next op
# uses the block directly, so an op costs one C++ autograd node on the block (the local op's own),
# and the backward runs entirely in C++ on the blocks. The wrapper reports ``requires_grad``,
# ``grad_fn`` (its block's) and ``is_leaf`` (False) like the dense result would; ``backward``,
# ``torch.autograd.backward/grad``, ``register_hook`` and ``retain_grad`` are routed to the block
# (:mod:`meshpar.sharding.grad_api`); the exact aten fallback gets a graph-connected wrapper
# (:func:`meshpar.sharding.core.materialize`).
#
# Code meshpar cannot see (``torch.autograd.Function.apply``, which bypasses ``__torch_function__``;
# ``torch.utils.checkpoint(use_reentrant=True)``) would record an edge to the wrapper itself. So that
# such a gradient is never lost silently, the wrapper is a leaf that requires grad and whose ``.grad``
# holds a *sentinel*: the autograd engine accumulating into it raises the error below.

_BLOCK_GRAPH_USE = (
    "a ShardedTensor computed under autograd was passed to code that meshpar's dispatcher does not see "
    "(a torch.autograd.Function.apply, or torch.utils.checkpoint with use_reentrant=True): its gradient would "
    "be lost. Pass meshpar.tracked(x) to such code (a graph-connected copy of x), or use "
    "torch.utils.checkpoint(..., use_reentrant=False) (Hugging Face: gradient_checkpointing_enable("
    "gradient_checkpointing_kwargs={'use_reentrant': False})).")


class _SentinelLink:
    """The ``_view`` of a gradient sentinel: every op that meets it (through :mod:`.views`' guard, which
    both dispatch levels run) raises instead of computing."""

    __slots__ = ()
    root = None
    steps = ()

    def stale(self) -> bool:
        from ..errors import ShardingError
        raise ShardingError(_BLOCK_GRAPH_USE)


_SENTINEL_LINK = _SentinelLink()


def grad_sentinel(lay: Layout, dtype: torch.dtype, device: torch.device) -> "ShardedTensor":
    """The ``.grad`` sentinel of block-graph results laid out as ``lay`` (shared; the layout keeps the last
    one made, by dtype and device: one per layout in practice)."""
    c = lay.sentinel
    if c is not None and c[0] is dtype and c[1] == device:
        return c[2]
    s = _mws(ShardedTensor, lay.shape, None, None, None, dtype, _STRIDED, device)
    s._local = torch.empty(0, dtype=dtype, device=device)
    s.spec, s.mesh, s._gshape = lay.spec, lay.mesh, lay.gshape
    s._lay = Layout(lay.spec, lay.mesh, lay.gshape, detached=True)  # never memoised under
    s._view = _SENTINEL_LINK
    lay.sentinel = (dtype, device, s)
    return s


def _adopt_block_graph(r: "ShardedTensor", local: torch.Tensor, lay: Layout) -> None:
    """Make the wrapper ``r`` (a leaf that requires grad) a block-graph result around ``local``."""
    r._local = local.detach()
    r._lg = local
    r._bg = True
    s = grad_sentinel(lay, local.dtype, local.device)
    with _DisableTF():
        r.grad = s


def new_block_graph(local: torch.Tensor, lay: Layout) -> "ShardedTensor":
    """A ShardedTensor around ``local``, a block that carries the autograd graph (see above).

    On every op's path under autograd: :func:`_adopt_block_graph` and the sentinel lookup are inlined
    (the calls measured about 1 µs per op on the CPU)."""
    dtype, device = local.dtype, local.device
    r = _mws(ShardedTensor, lay.shape, None, None, None, dtype, _STRIDED, device, False, True)
    r._local, r._lay, r.spec, r.mesh, r._gshape = local.detach(), lay, lay.spec, lay.mesh, lay.gshape
    r._lg = local
    r._bg = True
    c = lay.sentinel
    s = c[2] if c is not None and c[0] is dtype and c[1] == device else grad_sentinel(lay, dtype, device)
    with _DisableTF():
        r.grad = s
    if local.is_conj() or local.is_neg():
        mirror_math_bits(r, local)
    return r


def make_block_graph(x: "ShardedTensor") -> None:
    """Turn ``x``, a wrapper without a graph whose block gained one (an in-place write from operands that
    require grad), into a block-graph result, in place."""
    with _DisableTF():
        x.requires_grad_(True)
    _adopt_block_graph(x, x._local, layout_of(x))


# ---------------------------------------------------------------------------- no-grad memo
# Executors memoised by rules for calls that need no autograd and no communication, keyed by
# :func:`fast_key`. Pure memoisation: an entry is a function of its key only. Owned (and bounded)
# by :class:`meshpar.sharding.dispatch.FastPaths`; defined here so the hot path needs no import.
_FAST: dict = {}
# the same for grad mode: executors that enter/wrap through autograd (one node per op at most)
_FAST_GRAD: dict = {}
# the same below autograd (__torch_dispatch__): aten calls whose blocks need no moves
_FAST_ATEN: dict = {}
_SCALARS = frozenset({int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format,
                      torch.layout})
_INT_SEQS = frozenset({tuple, list, torch.Size})
_G = object()  # tag of keys built by the general loop
_KW = object()  # separates positional from keyword parts in general keys


def fast_key(func, args, kwargs=None):
    """A hashable key for a call, or None when an argument can't be keyed.

    The key holds the func and, for each argument, what a rule's plan may depend on: a
    ShardedTensor's interned :class:`Layout` (spec, global shape, mesh), a scalar's type and
    value (so ``1``, ``1.0`` and ``True`` never share an entry), a tuple/list of ints' type and
    items; keyword arguments likewise, by name. A plain tensor, a nested structure or any other
    object makes the call unkeyable (None). Three key formats, told apart by length and tag:
    ``(func, L)``, ``(func, L, L)`` (one or two ShardedTensors, no keywords: spelled out, the
    commonest calls) and ``(func, _G, ...)`` (anything else keyable, flattened).
    """
    n = len(args)
    if n:
        a = args[0]
        if type(a) is ShardedTensor:
            if not kwargs:
                if n == 1:
                    return (func, a._lay or layout_of(a))
                if n == 2:
                    b = args[1]
                    if type(b) is ShardedTensor:
                        return (func, a._lay or layout_of(a), b._lay or layout_of(b))
    return _fast_key_general(func, args, kwargs)


def _fast_key_general(func, args, kwargs):
    k = [func, _G]
    ap = k.append
    for a in args:
        t = type(a)
        if t is ShardedTensor:
            ap(a._lay or layout_of(a))
        elif t in _SCALARS:
            ap(t)
            ap(a)
        elif t in _INT_SEQS:
            for e in a:
                if type(e) is not int:
                    return None
            ap(t)
            ap(tuple(a))
        else:
            return None
    if kwargs:
        ap(_KW)
        for name, v in kwargs.items():
            t = type(v)
            if t in _SCALARS:
                ap(name)
                ap(t)
                ap(v)
            elif t in _INT_SEQS:
                for e in v:
                    if type(e) is not int:
                        return None
                ap(name)
                ap(t)
                ap(tuple(v))
            else:
                return None
    return tuple(k)


# ---------------------------------------------------------------------------- executors
# Builders of no-grad executors ``ex(args, kwargs) -> ShardedTensor`` that compute a local block and
# wrap it as ``lay``, with the wrapper construction inlined (one Python frame per call).

def blockwise_exec(func, lay: Layout, n: int):
    """``func(args[0]._local, ..., args[n-1]._local)`` for n ShardedTensor operands (n = 1, 2, 3)."""
    shape, spec, mesh, gshape = lay.shape, lay.spec, lay.mesh, lay.gshape
    if n == 1:
        def ex(args, kwargs):
            loc = func(args[0]._local)
            r = _mws(ShardedTensor, shape, None, None, None, loc.dtype, _STRIDED, loc.device)
            r._local, r._lay, r.spec, r.mesh, r._gshape = loc, lay, spec, mesh, gshape
            if loc.is_conj() or loc.is_neg():
                mirror_math_bits(r, loc)
            return r
    elif n == 2:
        def ex(args, kwargs):
            loc = func(args[0]._local, args[1]._local)
            r = _mws(ShardedTensor, shape, None, None, None, loc.dtype, _STRIDED, loc.device)
            r._local, r._lay, r.spec, r.mesh, r._gshape = loc, lay, spec, mesh, gshape
            if loc.is_conj() or loc.is_neg():
                mirror_math_bits(r, loc)
            return r
    elif n == 3:
        def ex(args, kwargs):
            loc = func(args[0]._local, args[1]._local, args[2]._local)
            r = _mws(ShardedTensor, shape, None, None, None, loc.dtype, _STRIDED, loc.device)
            r._local, r._lay, r.spec, r.mesh, r._gshape = loc, lay, spec, mesh, gshape
            if loc.is_conj() or loc.is_neg():
                mirror_math_bits(r, loc)
            return r
    else:
        raise ValueError(n)
    return ex


def same_call_exec(func, lay: Layout, with_kwargs: bool):
    """``func(args[0]._local, *args[1:], **kwargs)``: the call itself on the first operand's block."""
    shape, spec, mesh, gshape = lay.shape, lay.spec, lay.mesh, lay.gshape
    if with_kwargs:
        def ex(args, kwargs):
            loc = func(args[0]._local, *args[1:], **kwargs)
            r = _mws(ShardedTensor, shape, None, None, None, loc.dtype, _STRIDED, loc.device)
            r._local, r._lay, r.spec, r.mesh, r._gshape = loc, lay, spec, mesh, gshape
            if loc.is_conj() or loc.is_neg():
                mirror_math_bits(r, loc)
            return r
    else:
        def ex(args, kwargs):
            loc = func(args[0]._local, *args[1:])
            r = _mws(ShardedTensor, shape, None, None, None, loc.dtype, _STRIDED, loc.device)
            r._local, r._lay, r.spec, r.mesh, r._gshape = loc, lay, spec, mesh, gshape
            if loc.is_conj() or loc.is_neg():
                mirror_math_bits(r, loc)
            return r
    return ex


def local_fn_exec(local_fn, lay: Layout):
    """``local_fn(args[0]._local)``."""
    shape, spec, mesh, gshape = lay.shape, lay.spec, lay.mesh, lay.gshape

    def ex(args, kwargs):
        loc = local_fn(args[0]._local)
        r = _mws(ShardedTensor, shape, None, None, None, loc.dtype, _STRIDED, loc.device)
        r._local, r._lay, r.spec, r.mesh, r._gshape = loc, lay, spec, mesh, gshape
        if loc.is_conj() or loc.is_neg():
            mirror_math_bits(r, loc)
        return r
    return ex


class ShardedTensor(torch.Tensor):
    """A block of a global tensor laid out by ``spec`` over ``mesh``.

    Attributes:
        spec: the :class:`P` layout.
        mesh: the :class:`~meshpar.mesh.Mesh`.
        _local: this rank's block, a plain tensor of shape ``local_shape(shape, spec, mesh)``.
        _gshape: the global shape, as a ``torch.Size``.

    ``spec``, ``mesh`` and the global shape are fixed at construction (the dispatcher caches the
    interned :class:`Layout` of the three in ``_lay``); a new layout means a new ShardedTensor.
    """

    _local: torch.Tensor
    spec: P
    mesh: Mesh
    _gshape: torch.Size
    _lay: "Layout | None"  # interned layout: None until the dispatcher first needs it (layout_of)

    # slots: attribute stores and loads on the hot path cost a third of instance-dict ones
    __slots__ = ("_local", "spec", "mesh", "_gshape", "_lay")
    # autograd helpers of meshpar.sharding.core.enter (instance values only where set)
    _lg = None    # the graph-connected block of a block-graph result, or of a materialized wrapper
    _lgv = None   # the wrapper's grad_fn when _lg was recorded
    _ent = None   # a leaf's entered blocks by vary (meshpar.sharding.core.enter)
    _view = None  # a detached view's link to its base (meshpar.sharding.views.ViewLink)
    _bg = False   # a block-graph result: the autograd graph lives on ``_lg`` (new_block_graph)

    @staticmethod
    def __new__(cls, local: torch.Tensor, spec: P, mesh: Mesh, shape: Sequence[int], requires_grad: bool = False):
        # positional: (size, strides, storage_offset, memory_format, dtype, layout, device, pin_memory, requires_grad)
        r = _mws(cls, tuple(shape), None, None, None, local.dtype, _STRIDED, local.device, False, requires_grad)
        r._local = local
        r.spec = spec
        r.mesh = mesh
        r._gshape = shape if type(shape) is torch.Size else torch.Size(shape)
        r._lay = None
        if local.is_conj() or local.is_neg():
            mirror_math_bits(r, local)
        return r

    def __init__(self, *args, **kwargs):  # everything happens in __new__
        pass

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in _GETTERS:  # autograd bookkeeping attributes: no layout involved
            if args[0]._bg and func in _BG_GETTERS:
                return _BG_GETTERS[func](args[0])
            with _DisableTF():
                return func(*args)
        if func is _SET_GRAD:  # ``x.grad = g``: bookkeeping too (a computed result keeps it aside, as retained)
            if args[0]._bg:
                args[0].__dict__["_retained"] = args[1]
                return None
            with _DisableTF():
                return func(*args)
        # fast path: a memoised executor for exactly this (op, layouts, arguments), one table per grad mode
        key = fast_key(func, args, kwargs)
        if key is not None:
            ex = (_FAST if not _grad_enabled() else _FAST_GRAD).get(key)
            if ex is not None:
                return ex(args, kwargs)
        return _HANDLER[0](func, args, kwargs or {})

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        key = fast_key(func, args, kwargs)
        if key is not None:
            ex = _FAST_ATEN.get(key)
            if ex is not None:
                return ex(args, kwargs)
        from .fallback import handle_dispatch
        return handle_dispatch(func, args, kwargs or {})

    # traceable wrapper subclass protocol: nn.Module._apply (``.to``, ``.double()``, ``.cuda()``) swaps
    # ShardedTensor parameters for their converted copies instead of ``.data =`` (which would keep the
    # old block); torch.compile uses the same protocol.
    def __tensor_flatten__(self):
        return ["_local"], (self.spec, self.mesh, tuple(self._gshape))

    @staticmethod
    def __tensor_unflatten__(inner, ctx, outer_size, outer_stride):
        spec, mesh, shape = ctx
        return ShardedTensor(inner["_local"], spec, mesh, shape)

    @property
    def local(self) -> torch.Tensor:
        """This rank's block as a plain tensor, connected to autograd."""
        from .core import enter
        return enter(self)

    def __reduce_ex__(self, proto):
        raise TypeError("a ShardedTensor cannot be pickled; use meshpar.unshard(x) or torch.distributed.checkpoint")

    def __repr__(self, *, tensor_contents=None) -> str:  # noqa: D401
        grad = ", requires_grad=True" if self.requires_grad else ""
        return (f"ShardedTensor(shape={tuple(self._gshape)}, spec={self.spec}, mesh={self.mesh}, "
                f"dtype={self.dtype}{grad}, local={self._local!r})")


_T = torch.Tensor
# attribute getters that only read autograd/dtype bookkeeping or the global shape of the wrapper (which
# ``_make_wrapper_subclass`` set to the global shape: no rule needed, and ``.shape`` is read on every op),
# and metadata methods answered from the same
_GETTERS = frozenset(getattr(_T, n).__get__ for n in (
    "requires_grad", "grad_fn", "is_leaf", "retains_grad", "_backward_hooks", "grad", "dtype", "device",
    "_version", "is_cuda", "layout", "_base", "shape", "ndim") if hasattr(_T, n)) | frozenset(
    # metadata methods of the wrapper (global sizes; no rule, no data, no autograd)
    getattr(_T, n) for n in ("dim", "size", "numel", "nelement", "element_size", "is_floating_point", "is_complex",
                             "is_signed", "get_device", "__len__"))
_DisableTF = torch._C.DisableTorchFunctionSubclass
_SET_GRAD = _T.grad.__set__
# what a block-graph result reports for its autograd attributes (the dense result's answers)
_BG_GETTERS = {
    _T.grad_fn.__get__: lambda x: x._lg.grad_fn,
    _T.is_leaf.__get__: lambda x: False,
    _T.grad.__get__: lambda x: x.__dict__.get("_retained"),
    _T.retains_grad.__get__: lambda x: "_retained" in x.__dict__,
    _T._backward_hooks.__get__: lambda x: None,
}

# filled by meshpar.sharding.dispatch at import (breaks the import cycle tensor <-> dispatch)
_HANDLER: list = [None]


def is_sharded(x) -> bool:
    return isinstance(x, ShardedTensor)
