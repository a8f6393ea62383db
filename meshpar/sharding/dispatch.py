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

from ..errors import ShardingError
from ..mesh.collectives import _CURRENT_OP as _OP
from .tensor import ShardedTensor

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

# Attribute access and bookkeeping that never needs a rule.
_PASSTHROUGH_NAMES = frozenset({
    "__get__", "__set__", "__delete__", "backward", "register_hook", "register_post_accumulate_grad_hook",
    "requires_grad_", "retain_grad", "dim", "size", "numel", "nelement", "element_size", "is_floating_point",
    "is_complex", "__hash__", "data_ptr", "is_contiguous", "stride", "storage_offset", "get_device",
    "__format__", "__len__", "__dir__", "__setstate__", "__deepcopy__", "_is_view", "is_signed",
    "untyped_storage", "_typed_storage", "has_names", "__reduce_ex__", "is_shared", "is_pinned",
})


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

    A rule that planned such a call may :meth:`remember` an executor under the call's
    :func:`signature` (the func, each operand's spec and global shape, the other arguments'
    values); the next call with the same signature skips planning. Pure memoisation: an entry
    is a function of its key only.
    """

    def __init__(self, limit: int = 16384) -> None:
        self._table: dict = {}
        self._limit = limit

    def get(self, key):
        return self._table.get(key)

    def remember(self, key, executor) -> None:
        if key is not None and len(self._table) < self._limit:
            self._table[key] = executor


FAST = FastPaths()
_SCALARS = (int, float, bool, str, type(None), torch.dtype)


def signature(func: Callable, args: tuple, kwargs: dict):
    """A hashable key for a call, or None when an argument can't be keyed."""
    sig = [func]
    if kwargs:
        for k in sorted(kwargs):
            v = kwargs[k]
            if type(v) not in _SCALARS:
                return None
            sig.append((k, v))
    for a in args:
        t = type(a)
        if t is ShardedTensor:
            sig.append((a.spec, a._gshape, a.mesh))
        elif t in _SCALARS:
            sig.append((t, a))
        else:
            return None
    return tuple(sig)


def handle_torch_function(func: Callable, args: tuple, kwargs: dict):
    if not torch.is_grad_enabled():
        # fast path: a memoised executor for exactly this (op, layouts, arguments)
        sig = signature(func, args, kwargs) if kwargs else [func]
        for a in (() if kwargs else args):
            t = type(a)
            if t is ShardedTensor:
                sig.append((a.spec, a._gshape, a.mesh))
            elif t in _SCALARS:
                sig.append((t, a))
            else:
                sig = None
                break
        if sig is not None:
            ex = FAST._table.get(sig if kwargs else tuple(sig))
            if ex is not None:
                return ex(args)
    rules = REGISTRY.rules_for(func)
    if rules:
        tok = _OP.set(getattr(func, "__name__", "op"))
        try:
            for rule in rules:
                out = rule(func, args, kwargs)
                if out is not NotImplemented:
                    return out
        finally:
            _OP.reset(tok)
        raise no_rule_error(func, args, kwargs)
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)


def remember_unary(func: Callable, args: tuple, kwargs: dict, local_fn: Callable, spec, shape) -> None:
    """Memoise ``out = local_fn(x._local)`` wrapped as (spec, shape) for this call's signature (no autograd)."""
    if torch.is_grad_enabled():
        return
    key = signature(func, args, kwargs)
    if key is None:
        return
    x = args[0]
    mesh = x.mesh
    shape = tuple(shape)
    FAST.remember(key, lambda a: ShardedTensor(local_fn(a[0]._local), spec, mesh, shape))


from .tensor import _HANDLER  # noqa: E402

_HANDLER[0] = handle_torch_function
