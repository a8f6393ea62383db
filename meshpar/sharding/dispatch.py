"""The op-rule registry and the ``__torch_function__`` handler.

A rule is a function ``rule(func, args, kwargs)`` registered for one or more torch callables.
It returns the result (usually built with :func:`meshpar.sharding.core.wrap`) or
``NotImplemented`` to let the next rule try. Rules registered later are tried first, so a
specialised algorithm (ring attention, SUMMA) can sit on top of a generic one.

Calls with no rule go to torch with the subclass disabled, which sends the aten ops to
:mod:`meshpar.sharding.fallback`: blockwise ops on same-layout operands work there, anything
else raises a ShardingError listing the specs and the ways out.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import ShardingError
from ..mesh.collectives import _CURRENT_OP as _OP
from . import views as _views
from .semantics import USER_OP, is_strict
from .spec import is_zigzag
from .core import OperandPlan, enter, grad_executor, materialize
from .tensor import _FAST, _FAST_GRAD, Layout, ShardedTensor, fast_key, layout, local_fn_exec, same_call_exec

Rule = Callable[[Callable, tuple, dict], Any]


class RuleRegistry:
    """Maps a torch callable to its rules, newest first."""

    def __init__(self) -> None:
        self._rules: dict[Callable, list[Rule]] = {}

    def register(self, *funcs: Callable) -> Callable[[Rule], Rule]:
        def deco(rule: Rule) -> Rule:
            for f in funcs:
                self._rules.setdefault(f, []).insert(0, rule)
            return rule
        return deco

    def rules_for(self, func: Callable) -> list[Rule] | None:
        return self._rules.get(func)


REGISTRY = RuleRegistry()
register = REGISTRY.register


def describe(args, kwargs) -> str:
    """The specs of the ShardedTensor arguments, for error messages."""
    out = []
    flat, _ = torch.utils._pytree.tree_flatten((args, kwargs))
    for a in flat:
        if isinstance(a, ShardedTensor):
            out.append(f"ShardedTensor{tuple(a._gshape)} {a.spec}")
        elif isinstance(a, torch.Tensor):
            out.append(f"Tensor{tuple(a.shape)} (replicated)")
    return ", ".join(out)


def no_rule_error(func, args, kwargs, why: str = "") -> ShardingError:
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
    return ShardingError(
        f"no sharding rule for {name} with operands [{describe(args, kwargs)}]"
        + (f": {why}" if why else "")
        + ". Options: meshpar.reshard(x, spec) to a layout this op supports, meshpar.unshard(x) to get the "
          "global tensor, or meshpar.shard_map(f, mesh, in_specs, out_specs) to write the local computation yourself.")


class FastPaths:
    """Memo of compiled executors for calls that need no autograd and no communication.

    A rule that planned such a call may :meth:`remember` an executor ``ex(args, kwargs)`` under
    the call's :func:`signature` (the func, each ShardedTensor's interned layout, the other
    arguments' types and values); the next call with the same signature, with grad mode off,
    skips planning: ``ShardedTensor.__torch_function__`` looks the key up before anything else.
    Pure memoisation: an entry is a function of its key only. Bounded at ``limit`` entries (later
    calls then just plan again).
    """

    def __init__(self, table: dict, limit: int = 16384) -> None:
        self._table = table
        self._limit = limit

    def get(self, key):
        return self._table.get(key)

    def remember(self, key, executor) -> None:
        if key is not None and len(self._table) < self._limit and not _unmemoisable(key):
            self._table[key] = executor

    def clear(self) -> None:
        self._table.clear()


def _unmemoisable(key: tuple) -> bool:
    """Whether a memo key holds a :class:`~meshpar.Zigzag` layout or a detached view's layout. Such
    calls are never memoised: the executors slice operands in contiguous blocks, and replaying one on
    a zigzag layout gave wrong values (found in the balanced-sp GPT under ``no_grad``); a detached
    view must be refreshed from its base and written through to it (:mod:`.views`) on every call."""
    for k in key:
        if type(k) is Layout and (k.detached or any(is_zigzag(k.spec.axes_of(d)) for d in range(len(k.spec.entries)))):
            return True
    return False


FAST = FastPaths(_FAST)
FAST_GRAD = FastPaths(_FAST_GRAD)
signature = fast_key  # the key rules remember under is the key the hot path looks up


def handle_torch_function(func: Callable, args: tuple, kwargs: dict):
    """Route a call to its rules (newest first); calls with no rule run with the subclass disabled,
    so their aten ops reach the exact fallback of :mod:`meshpar.sharding.fallback`.

    A rule that refuses the layouts it was given (a ShardingError, raised before any collective)
    also sends the call to the fallback, which reshards implicitly; inside :func:`meshpar.strict`
    the rule's refusal is raised instead. The no-grad memo lookup happens before this, in
    ``ShardedTensor.__torch_function__``.
    """
    g = _views.guard(args, kwargs)
    if g is not None:  # detached views among the operands: refresh them, write them through after
        return g.done(func, args, kwargs, _route(func, args, kwargs))
    return _route(func, args, kwargs)


def _route(func: Callable, args: tuple, kwargs: dict):
    rules = REGISTRY.rules_for(func)
    utok = USER_OP.set(func)
    try:
        if kwargs.get("out") is not None:
            # rules compute a new result and would leave ``out`` unwritten: the aten ``.out`` overload
            # reaches the exact fallback, which writes ``out`` in its own layout and returns it
            return _via_aten(func, args, kwargs, None)
        if rules:
            tok = _OP.set(getattr(func, "__name__", "op"))
            try:
                for rule in rules:
                    try:
                        out = rule(func, args, kwargs)
                    except ShardingError as e:
                        if is_strict():
                            raise
                        return _via_aten(func, args, kwargs, e)
                    if out is not NotImplemented:
                        return out
            finally:
                _OP.reset(tok)
        return _via_aten(func, args, kwargs, None)
    finally:
        USER_OP.reset(utok)


def _via_aten(func, args, kwargs, refusal: ShardingError | None):
    """Run the call with the subclass disabled (its aten ops reach the exact fallback). When a rule
    refused the call first and the fallback fails too, the rule's refusal is what the user sees.

    Under autograd the aten ops record their nodes on the wrappers, so block-graph operands enter as
    graph-connected wrappers (:func:`.core.materialize`); an in-place op on a block-graph result runs on
    such a copy of it, whose new value is then copied into the result's block (recorded there)."""
    target = None
    x0 = args[0] if args else None
    if type(x0) is ShardedTensor and x0._bg and getattr(func, "__name__", "") in _INPLACE_VIEWS:
        return _inplace_view(func, args, kwargs)
    if torch.is_grad_enabled():
        args, kwargs, target = _graph_operands(func, args, kwargs)
    with torch._C.DisableTorchFunctionSubclass():
        if refusal is None:
            out = func(*args, **kwargs)
        else:
            try:
                out = func(*args, **kwargs)
            except Exception as e:  # noqa: BLE001
                raise refusal from e
    if target is None:
        return out
    x, m = target
    x._lg.copy_(enter(m))
    return x if out is m else out


_INPLACE_VIEWS = frozenset({"unsqueeze_", "squeeze_", "transpose_", "t_", "swapdims_", "swapaxes_"})


def _inplace_view(func, args, kwargs):
    """An in-place view op on a block-graph result: the wrapper's metadata and detached block change at the
    aten level (no autograd there), and the graph-connected block becomes the same view of itself."""
    x = args[0]
    lg = x._lg
    with torch.no_grad(), torch._C.DisableTorchFunctionSubclass():
        func(*args, **kwargs)
    with torch.enable_grad():
        x._lg = getattr(torch.Tensor, func.__name__[:-1])(lg, *args[1:], **kwargs)
    return x


_NOT_INPLACE_DUNDERS = frozenset({"__init__", "__iter__", "__index__", "__int__", "__invert__", "__instancecheck__"})


def writes_first_operand(func) -> bool:
    """Whether ``func`` is an in-place op on its first argument (``add_``, ``__iadd__``, ``__setitem__``)."""
    name = getattr(func, "__name__", "")
    if name.endswith("__"):
        return name == "__setitem__" or (name.startswith("__i") and name not in _NOT_INPLACE_DUNDERS)
    return name.endswith("_") and not name.startswith("_")


def _any_block_graph(args, kwargs) -> bool:
    """Whether a block-graph ShardedTensor is among the operands (top level, or in a list, tuple or dict)."""
    for a in (*args, *kwargs.values()):
        t = type(a)
        if t is ShardedTensor:
            if a._bg:
                return True
        elif t in (list, tuple, dict):
            flat, _ = tree_flatten(a)
            if any(type(b) is ShardedTensor and b._bg for b in flat):
                return True
    return False


def _graph_operands(func, args, kwargs):
    """``(args, kwargs, target)`` with every block-graph ShardedTensor operand replaced by a graph-connected
    wrapper; ``target`` is ``(x, copy)`` when ``func`` writes a block-graph ``x`` in place (else None).
    An ``out=`` tensor is left as it is (torch refuses ``out=`` under autograd itself)."""
    if not _any_block_graph(args, kwargs):
        return args, kwargs, None
    flat, tree = tree_flatten((args, kwargs))
    out_kw = kwargs.get("out")
    x0 = args[0] if args else None
    target = None
    if type(x0) is ShardedTensor and x0._bg and writes_first_operand(func):
        target = (x0, materialize(x0, clone=True))
    new = []
    for a in flat:
        if type(a) is ShardedTensor and a._bg and a is not out_kw:
            a = target[1] if target is not None and a is target[0] else materialize(a)
        new.append(a)
    args, kwargs = tree_unflatten(new, tree)
    return args, kwargs, target


def remember(func: Callable, args: tuple, kwargs: dict, executor: Callable) -> None:
    """Memoise ``executor(args, kwargs)`` for this call's signature when grad mode is off.

    The executor must compute exactly what the rule computed, for every call with the same
    signature, without autograd and without communication."""
    if torch.is_grad_enabled():
        return
    FAST.remember(signature(func, args, kwargs), executor)


def remember_unary(func: Callable, args: tuple, kwargs: dict, local_fn: Callable, spec, shape) -> None:
    """Memoise ``out = local_fn(x._local)`` wrapped as (spec, shape) for this call's signature (no autograd)."""
    if torch.is_grad_enabled():
        return
    key = signature(func, args, kwargs)
    if key is None:
        return
    FAST.remember(key, local_fn_exec(local_fn, layout(spec, shape, args[0].mesh)))


def remember_same_call(func: Callable, args: tuple, kwargs: dict, spec, shape) -> None:
    """Memoise ``func(x._local, *args[1:], **kwargs)`` wrapped as (spec, shape): for ops whose result's
    block is the same call on the operand's block (transpose, softmax over a whole dim, sum).

    The executor passes the call's own arguments (equal to these, by the signature), so no value
    is baked in. Only the first argument may be a ShardedTensor."""
    if torch.is_grad_enabled():
        return
    for a in args[1:]:
        if isinstance(a, torch.Tensor):
            return
    key = signature(func, args, kwargs)
    if key is None:
        return
    FAST.remember(key, same_call_exec(func, layout(spec, shape, args[0].mesh), bool(kwargs)))


def remember_grad(func: Callable, args: tuple, kwargs: dict, local_fn: Callable, spec, shape, mesh) -> None:
    """Memoise, for grad-mode calls with this call's signature, ``wrap(local_fn(enter(args[0])), spec, shape)``:
    for rules whose whole computation under autograd is one local function of the first operand's block
    (views). The executor builds what the rule builds (the same autograd node), without routing or planning."""
    if not torch.is_grad_enabled():
        return
    key = signature(func, args, kwargs)
    if key is None:
        return
    FAST_GRAD.remember(key, grad_executor(local_fn, (OperandPlan((), ()),), spec, tuple(shape), mesh))


from .tensor import _HANDLER  # noqa: E402

_HANDLER[0] = handle_torch_function
