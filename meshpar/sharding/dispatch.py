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
from ..mesh.collectives import op_name
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


def handle_torch_function(func: Callable, args: tuple, kwargs: dict):
    rules = REGISTRY.rules_for(func)
    if rules:
        with op_name(getattr(func, "__name__", str(func))):
            for rule in rules:
                out = rule(func, args, kwargs)
                if out is not NotImplemented:
                    return out
        raise no_rule_error(func, args, kwargs)
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)
