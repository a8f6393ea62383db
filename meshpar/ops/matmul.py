"""matmul / mm / bmm / @, einsum and F.linear on ShardedTensors.

The blockwise plan of :mod:`.contract` is tried first. When the operands' specs split the
contraction inconsistently, the registered multi-step algorithms (SUMMA 2D, 2.5D, 3D, ...) are
tried in priority order; each returns ``None`` when the specs are not its own.
"""
from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import ShardingError
from ..sharding.dispatch import describe, register, signature
from ..sharding.tensor import ShardedTensor
from ._util import common_mesh, gshape
from .contract import plan_local, reduce_extra_unreduced, run_local

T = torch.Tensor
MatmulAlgorithm = Callable[[ShardedTensor, ShardedTensor], "ShardedTensor | None"]


@dataclass(frozen=True)
class _Algo:
    name: str
    fn: MatmulAlgorithm
    priority: int


class MatmulAlgorithms:
    """Registry of multi-step matmul algorithms, highest priority first."""

    def __init__(self) -> None:
        self._algos: list[_Algo] = []

    def register(self, name: str, fn: MatmulAlgorithm, priority: int = 0) -> None:
        self._algos = [a for a in self._algos if a.name != name] + [_Algo(name, fn, priority)]
        self._algos.sort(key=lambda a: -a.priority)

    def names(self) -> list[str]:
        return [a.name for a in self._algos]

    def __iter__(self):
        return iter(list(self._algos))


ALGORITHMS = MatmulAlgorithms()


def register_matmul_algorithm(name: str, fn: MatmulAlgorithm, priority: int = 0) -> None:
    """Add ``fn(a, b) -> ShardedTensor | None`` as a candidate for ``a @ b``."""
    ALGORITHMS.register(name, fn, priority)


def matmul_labels(nda: int, ndb: int) -> tuple[str, str, str]:
    """einsum labels of torch.matmul for operands of ``nda`` and ``ndb`` dims."""
    if nda == 0 or ndb == 0:
        raise RuntimeError("both arguments to matmul need to be at least 1D")
    k, m, n = "k", "m", "n"
    batch = "abcdefghij"
    if nda == 1 and ndb == 1:
        return k, k, ""
    if nda == 1:
        bb = batch[: ndb - 2]
        return k, bb + k + n, bb + n
    if ndb == 1:
        ba = batch[: nda - 2]
        return ba + m + k, k, ba + m
    nb = max(nda, ndb) - 2
    bl = batch[:nb]
    return bl[nb - (nda - 2):] + m + k, bl[nb - (ndb - 2):] + k + n, bl + m + n


def sharded_matmul(a, b, fast_key=None):
    """``a @ b`` where at least one operand is a ShardedTensor."""
    sts = [x for x in (a, b) if isinstance(x, ShardedTensor)]
    mesh = common_mesh(sts)
    a, b = reduce_extra_unreduced([a, b])
    la, lb, lo = matmul_labels(len(gshape(a)), len(gshape(b)))
    plan = plan_local([a, b], [la, lb], lo)
    if plan is not None:
        if len(sts) == 2 and not any(x.spec.unreduced for x in sts):
            from .pointwise import remember_blockwise
            remember_blockwise(fast_key, torch.matmul, plan.operand_plans, plan.out_spec, plan.out_shape, mesh)
        return run_local(torch.matmul, [a, b], [la, lb], lo, mesh, plan)
    if isinstance(a, ShardedTensor) and isinstance(b, ShardedTensor):
        for algo in ALGORITHMS:
            out = algo.fn(a, b)
            if out is not None:
                return out
    raise ShardingError(
        f"no matmul algorithm for [{describe((a, b), {})}]: the contraction dim is split differently on the two "
        f"operands and no registered algorithm ({', '.join(ALGORITHMS.names()) or 'none'}) takes these specs. "
        "Options: meshpar.reshard one operand so the contraction splits match, or use a layout from "
        "docs/tensor-parallel.md (1D, SUMMA 2D, 2.5D, 3D).")


@register(torch.matmul, T.matmul, T.__matmul__, torch.mm, T.mm, torch.bmm, T.bmm)
def _matmul(func, args, kwargs):
    return sharded_matmul(args[0], args[1], signature(func, args, kwargs))


@register(T.__rmatmul__)
def _rmatmul(func, args, kwargs):
    return sharded_matmul(args[1], args[0])


@register(F.linear)
def _linear(func, args, kwargs):
    """``F.linear(x, w[out, in], b[out])``: one blockwise F.linear when the result is not unreduced."""
    x = args[0]
    w = kwargs.get("weight", args[1] if len(args) > 1 else None)
    b = kwargs.get("bias", args[2] if len(args) > 2 else None)
    operands = [x, w] + ([b] if b is not None else [])
    if len(gshape(w)) == 2 and not any(isinstance(o, ShardedTensor) and o.spec.unreduced for o in operands):
        nx = len(gshape(x))
        batch = "abcdefghij"[: nx - 1]
        labels = [batch + "k", "nk"] + (["n"] if b is not None else [])
        plan = plan_local(operands, labels, batch + "n")
        if plan is not None and not plan.out_spec.unreduced:
            mesh = common_mesh([o for o in operands if isinstance(o, ShardedTensor)])
            key = signature(func, tuple(operands), {}) if all(isinstance(o, ShardedTensor) for o in operands) else None
            if not kwargs:
                from .pointwise import remember_blockwise
                remember_blockwise(key, F.linear, plan.operand_plans, plan.out_spec, plan.out_shape, mesh)
            return run_local(F.linear, operands, labels, batch + "n", mesh, plan)
    y = sharded_matmul(x, w.transpose(0, 1) if w.ndim == 2 else w)
    return y + b if b is not None else y


def _expand_ellipsis(eq: str, ndims: list[int]) -> tuple[list[str], str]:
    lhs, _, rhs = eq.replace(" ", "").partition("->")
    ins = lhs.split(",")
    free = [c for c in string.ascii_uppercase + string.ascii_lowercase if c not in eq]
    ell_n = 0
    for s, nd in zip(ins, ndims):
        if "..." in s:
            ell_n = max(ell_n, nd - (len(s) - 3))
    ell = "".join(free[:ell_n])
    outs = []
    for s, nd in zip(ins, ndims):
        if "..." in s:
            k = nd - (len(s) - 3)
            s = s.replace("...", ell[ell_n - k:])
        outs.append(s)
    if not _:
        counts = {}
        for s in outs:
            for c in s:
                counts[c] = counts.get(c, 0) + 1
        rhs = ell + "".join(sorted(c for c, n in counts.items() if n == 1 and c not in ell))
    else:
        rhs = rhs.replace("...", ell)
    return outs, rhs


@register(torch.einsum)
def _einsum(func, args, kwargs):
    eq = args[0]
    ops = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
    sts = [x for x in ops if isinstance(x, ShardedTensor)]
    mesh = common_mesh(sts)
    ops = reduce_extra_unreduced(ops)
    labels, out = _expand_ellipsis(eq, [len(gshape(x)) for x in ops])
    plan = plan_local(ops, labels, out)
    if plan is None:
        raise ShardingError(f"einsum {eq!r}: labels are split inconsistently across operands "
                            f"[{describe(tuple(ops), {})}]; reshard so each label has one split")
    full = ",".join(labels) + "->" + out
    return run_local(lambda *l: torch.einsum(full, *l), ops, labels, out, mesh, plan)


@register(torch.addmm, T.addmm)
def _addmm(func, args, kwargs):
    """``addmm(input, m1, m2, beta=1, alpha=1)`` = ``beta*input + alpha*(m1 @ m2)`` (HF GPT-2's Conv1D):
    the sharded matmul (any algorithm) plus the broadcast add."""
    names = ("input", "mat1", "mat2")
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    if "out" in kwargs:
        raise ShardingError("addmm(out=...) on ShardedTensors: use the functional form")
    y = sharded_matmul(bound["mat1"], bound["mat2"])
    if alpha != 1:
        y = y * alpha
    inp = bound["input"]
    return y + (inp if beta == 1 else inp * beta)
