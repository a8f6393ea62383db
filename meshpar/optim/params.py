"""How the optimizer layer sees a parameter: its local block, its grad's local block, its axes.

A parameter is either a plain ``torch.Tensor`` (replicated over the whole mesh: pure data
parallelism) or a meshpar ``ShardedTensor`` (tensor parallelism). ZeRO works on local blocks only;
every data rank of one tensor-parallel coordinate holds a block of the same shape.
"""
from __future__ import annotations

import torch

#: Attribute the sharding core honors on a ShardedTensor parameter: skip the sum over these axes in
#: backward, so the grad arrives unreduced over them (``grad.spec.unreduced``) and the optimizer
#: layer's bucketed reducer sums it instead.
DEFER_ATTR = "_meshpar_defer_reduce"


def is_sharded(p: torch.Tensor) -> bool:
    """True for a meshpar ShardedTensor (duck-typed, so this layer needs no import of the core)."""
    return hasattr(p, "_local") and hasattr(p, "spec") and hasattr(p, "mesh")


def local_of(p: torch.Tensor) -> torch.Tensor:
    """The tensor that holds this rank's values: ``p`` itself, or the block of a ShardedTensor."""
    return p._local if is_sharded(p) else p


def grad_local(p: torch.Tensor) -> torch.Tensor | None:
    """The local block of ``p.grad`` (None when there is none)."""
    g = p.grad
    if g is None:
        return None
    return g._local if is_sharded(g) else g


def grad_unreduced_axes(p: torch.Tensor) -> tuple[str, ...]:
    """Axes over which ``p.grad`` is still a partial sum (empty for plain tensors)."""
    g = p.grad
    if g is None or not is_sharded(g):
        return ()
    return tuple(getattr(g.spec, "unreduced", ()) or ())


def grad_factor(p: torch.Tensor, axis: str, nd: int, grad_reduce: str = "auto") -> float:
    """The factor of ``p``'s local gradient block before it is summed over the data ``axis`` of size ``nd``.

    ``"sum"``: 1; ``"mean"``: ``1/nd``; ``"auto"``: a ShardedTensor gradient still partial over ``axis``
    (``grad.spec.unreduced``, a slice of one global loss) is summed (1), an already reduced one is
    averaged over its ``nd`` equal copies, and a plain tensor's per-rank gradient of a per-rank mean
    loss is averaged (the DDP convention). Read while ``p.grad`` is set (a post-accumulate-grad hook).
    """
    if grad_reduce == "sum":
        return 1.0
    if grad_reduce == "mean":
        return 1.0 / nd
    if is_sharded(p):
        return 1.0 if axis in grad_unreduced_axes(p) else 1.0 / nd
    return 1.0 / nd


def sharded_axes(p: torch.Tensor) -> tuple[str, ...]:
    """Mesh axes the parameter's tensor dimensions are split over, in mesh order (empty when replicated)."""
    if not is_sharded(p):
        return ()
    spec = p.spec
    if hasattr(spec, "used_axes"):
        # in mesh order: a frozenset's order depends on the process's string-hash seed, and callers use
        # these tuples as keys of collectives every rank must issue in the same order
        used = spec.used_axes()
        return tuple(a for a in p.mesh.names if a in used)
    out: list[str] = []
    for e in spec.entries:
        if e is None:
            continue
        out.extend((e,) if isinstance(e, str) else e)
    return tuple(out)


def describe(p: torch.Tensor, name: str | None = None) -> str:
    """Short human description for error messages."""
    who = name or "parameter"
    if is_sharded(p):
        return f"{who} (shape {tuple(p.shape)}, spec {p.spec})"
    return f"{who} (shape {tuple(p.shape)}, plain tensor)"
