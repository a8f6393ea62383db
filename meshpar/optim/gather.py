"""ZeRO stage 3: parameters stored sharded over data, gathered per module just before use.

Each module that directly owns trainable parameters is a *unit* with its own bucket(s). A
forward pre-hook all-gathers the unit (and starts the next unit's gather, the prefetch); a
forward hook frees it again and hooks the module's outputs so that their gradient, which
arrives just before the module's backward, re-gathers it (prefetching the unit before it). When
all of the unit's gradients have arrived, the grads are reduce-scattered and the unit is freed.

Tensors that autograd saves during a unit's forward and that alias a gathered bucket (the
parameter itself, ``weight.t()``, a ShardedTensor's block view, ...) are packed by
``saved_tensors_hooks`` as (bucket, offset, size, stride) instead of keeping the gathered storage
alive; unpacking in backward re-gathers the bucket if needed. So the full parameters really are
freed between forward and backward. Freeing swaps each parameter's storage for an empty tensor.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._pytree import tree_flatten

from ..mesh import collectives as C
from .layout import Bucket
from .params import local_of

if TYPE_CHECKING:
    from .zero import ZeroOptimizer


def unit_order(module: torch.nn.Module, named: list) -> tuple[list, None]:
    """Trainable optimizer params in module order, with a ``(None, None, None)`` marker after each module."""
    want = {id(p): (g, n, p) for g, n, p in named}
    order, done = [], set()
    for m in module.modules():
        took = False
        for p in m.parameters(recurse=False):
            if id(p) in want and id(p) not in done:
                order.append(want[id(p)])
                done.add(id(p))
                took = True
        if took:
            order.append((None, None, None))
    return order, None


def install(zo: "ZeroOptimizer") -> list[Any]:
    """Register the module hooks of every unit; returns the hook handles."""
    owner: dict[int, torch.nn.Module] = {}
    for m in zo.module.modules():
        for p in m.parameters(recurse=False):
            owner.setdefault(id(p), m)
    units: list[tuple[torch.nn.Module, list[Bucket]]] = []
    for b in zo.buckets:
        m = owner[id(b.entries[0].param)]
        if units and units[-1][0] is m:
            units[-1][1].append(b)
        else:
            units.append((m, [b]))
    zo._units = units
    handles = []
    for i, (m, _) in enumerate(units):
        handles.append(m.register_forward_pre_hook(functools.partial(_pre_forward, zo, i)))
        handles.append(m.register_forward_hook(functools.partial(_post_forward, zo, i)))
    return handles


class _Saved:
    """A saved tensor that aliases a gathered bucket, kept as coordinates into the bucket."""

    __slots__ = ("bucket", "offset", "size", "stride")

    def __init__(self, bucket: Bucket, t: torch.Tensor) -> None:
        self.bucket, self.offset, self.size, self.stride = bucket, t.storage_offset(), t.size(), t.stride()


def _pack(zo: "ZeroOptimizer", t: torch.Tensor):
    if hasattr(t, "_local") or t.device.type == "meta":  # a ShardedTensor wrapper holds no storage itself
        return t
    b = zo._gathered_ptr.get(t.untyped_storage().data_ptr())
    if b is None:
        return t
    zo._packed += 1
    return _Saved(b, t)


def _unpack(zo: "ZeroOptimizer", x):
    if not isinstance(x, _Saved):
        return x
    wait(zo, x.bucket)
    return x.bucket.gathered.as_strided(x.size, x.stride, x.offset)


def start(zo: "ZeroOptimizer", b: Bucket) -> None:
    if b.gathered is None and b.gather_pending is None:
        with C.op_name(f"zero3 gather bucket {b.index}"):
            b.gather_pending = C.all_gather(b.flat, zo.mesh, zo.axis, 0, async_op=True)


def wait(zo: "ZeroOptimizer", b: Bucket) -> None:
    if b.gathered is not None:
        return
    start(zo, b)
    full = b.gather_pending.wait()
    b.gather_pending = None
    b.gathered = full
    zo._gathered_ptr[full.untyped_storage().data_ptr()] = b
    for e in b.entries:
        local_of(e.param).data = full[e.offset:e.offset + e.numel].view(e.shape)


def free(b: Bucket, zo: "ZeroOptimizer") -> None:
    if b.gather_pending is not None:  # complete the collective every rank issued
        b.gather_pending.wait()
        b.gather_pending = None
    if b.gathered is None:
        return
    zo._gathered_ptr.pop(b.gathered.untyped_storage().data_ptr(), None)
    b.gathered = None
    for e in b.entries:
        loc = local_of(e.param)
        loc.data = torch.empty(0, dtype=loc.dtype, device=loc.device)


def _gather_unit(zo: "ZeroOptimizer", i: int, nxt: int) -> None:
    units = zo._units
    for b in units[i][1]:
        start(zo, b)
    if zo.prefetch and 0 <= nxt < len(units):
        for b in units[nxt][1]:
            start(zo, b)
    for b in units[i][1]:
        wait(zo, b)


def _pre_forward(zo: "ZeroOptimizer", i: int, module, args) -> None:
    _gather_unit(zo, i, i + 1)
    if torch.is_grad_enabled():
        ctx = torch.autograd.graph.saved_tensors_hooks(functools.partial(_pack, zo), functools.partial(_unpack, zo))
        ctx.__enter__()
        zo._saved_ctx.append((i, ctx))


def _post_forward(zo: "ZeroOptimizer", i: int, module, args, output) -> None:
    if zo._saved_ctx and zo._saved_ctx[-1][0] == i:
        zo._saved_ctx.pop()[1].__exit__(None, None, None)
    if torch.is_grad_enabled():
        leaves, _ = tree_flatten(output)
        for t in leaves:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(functools.partial(_pre_backward, zo, i))
    for b in zo._units[i][1]:
        free(b, zo)


def _pre_backward(zo: "ZeroOptimizer", i: int, grad: torch.Tensor) -> None:
    units = zo._units
    if any(len(b.seen) < len(b.entries) for b in units[i][1]):
        _gather_unit(zo, i, i - 1)
    return None


def end_backward(zo: "ZeroOptimizer") -> None:
    """Free every unit (including prefetches nobody used)."""
    for b in zo.buckets:
        free(b, zo)


invalidate = end_backward


def gather_all(zo: "ZeroOptimizer") -> None:
    """Gather every unit's parameters (collective over the data axis): afterwards each parameter holds
    its full value (its tensor-parallel block), as in stages 0-2, until the next forward frees the
    units again (their hooks re-gather on demand). Used by ``Engine.gather_model()`` under stage 3."""
    for b in zo.buckets:
        start(zo, b)
    for b in zo.buckets:
        wait(zo, b)
