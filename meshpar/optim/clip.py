"""Global gradient norm over all shards and all mesh axes, each element counted exactly once.

A replicated block contributes once, not once per replica: squares are summed over the local
block and then all-reduced only over the axes the block is *sharded* over (the tensor-parallel
axes of its spec, plus the data axis where ZeRO shards the gradient).
"""
from __future__ import annotations

from typing import Iterable

import torch

from ..mesh import Mesh, collectives as C
from .params import grad_local, sharded_axes


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.device.type in ("cpu", "cuda") else torch.float32


def sum_sq_by_axes(parts: Iterable[tuple[tuple[str, ...], torch.Tensor]], mesh: Mesh,
                   all_keys: Iterable[tuple[str, ...]] = (), disjoint_axes: tuple[str, ...] = ()) -> torch.Tensor:
    """Square root of the sum of squares of every ``(axes, tensor)`` part, all-reduced per distinct
    ``axes`` tuple.

    ``all_keys`` lists axis tuples every rank must reduce over even when it has no part for them
    (so every rank issues the same collectives in the same order). ``disjoint_axes`` (pipeline
    stages): ranks along them hold different parameters, so the total is then summed over them
    too (one all-reduce; the per-key reductions stay inside each stage, whose ranks agree on keys).
    """
    sums: dict[tuple[str, ...], torch.Tensor] = {}
    dev = None
    for axes, t in parts:
        dev = t.device
        v = t.detach().to(_acc_dtype(t)).pow(2).sum()
        sums[axes] = sums[axes] + v if axes in sums else v
    dev = dev or mesh.device
    keys = sorted(set(sums) | set(all_keys))
    total = torch.zeros((), dtype=torch.float64, device=dev)
    for k in keys:
        v = sums.get(k, torch.zeros((), dtype=torch.float64, device=dev)).to(torch.float64)
        axes = tuple(a for a in mesh.names if a in k)  # canonical order
        total = total + (C.all_reduce(v.reshape(1), mesh, axes)[0] if axes else v)
    if disjoint_axes:
        total = C.all_reduce(total.reshape(1), mesh, disjoint_axes)[0]
    return total.sqrt()


def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float, mesh: Mesh, *,
                    eps: float = 1e-6) -> torch.Tensor:
    """Clip the grads of ``params`` (plain or ShardedTensor) to global norm ``max_norm``.

    Every rank must pass the same list of parameters (same order). Plain tensors are treated as
    replicated over the mesh; for a ShardedTensor the squares of its local block are summed over
    the axes its spec shards it over. Returns the global norm before clipping.
    """
    params = [p for p in params if p.grad is not None]
    parts, keys = [], set()
    for p in params:
        ax = sharded_axes(p)
        keys.add(ax)
        parts.append((ax, grad_local(p)))
    norm = sum_sq_by_axes(parts, mesh, keys)
    coef = clip_coef(norm, max_norm, eps)
    grads = [grad_local(p) for p in params]
    if grads:
        torch._foreach_mul_(grads, coef.to(grads[0].device))
    return norm


def clip_coef(norm: torch.Tensor, max_norm: float, eps: float = 1e-6) -> torch.Tensor:
    """``min(1, max_norm / (norm + eps))`` as a 0-dim tensor on ``norm``'s device (no host sync);
    a non-finite norm gives 1 (an fp16 step with inf/NaN gradients is skipped anyway).

    Multiplying by a coefficient of exactly 1.0 leaves gradients bit-identical, so callers
    multiply unconditionally instead of reading the norm on the host."""
    coef = torch.clamp(max_norm / (norm + eps), max=1.0)
    return torch.where(torch.isfinite(norm), coef, torch.ones_like(coef))
