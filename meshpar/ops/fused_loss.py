"""Fused (chunked) linear + cross-entropy: the loss of ``x @ W.T`` without the full logits.

``loss = cross_entropy(x @ weight.T, targets)`` for ``x [..., C]``, ``weight [V, C]``, ``targets [...]``.
The forward walks the tokens in chunks of ``chunk_size`` rows; per chunk it computes the chunk's
logits ``[n, V]``, their log-sum-exp, the loss, and the gradient ``softmax - onehot`` (scaled for the
reduction), then immediately the input gradient ``g @ W`` and the weight gradient ``g.T @ x_chunk``
(accumulated). The chunk's logits are freed before the next chunk, so the head's extra memory is one
chunk of logits (``n * V`` floats) plus ``dW``; nothing of size ``N * V`` ever exists. The backward
only scales the saved ``dx, dW`` by the incoming scalar gradient.

Per chunk the elementwise work is three pieces over the chunk's logits (row max and target logit; sum of
``exp``; the gradient), each one pass; on CUDA each piece is ``torch.compile``d (one fused kernel
reading the half-precision logits; set ``MESHPAR_FUSED_LOSS_COMPILE=0`` for the eager pieces, which
are also the CPU path and the fallback when compiling fails).

Vocab-parallel (``mesh`` and ``vocab_axes`` given): each rank holds ``weight [V/|Va|, C]``, rows
``[r*V/|Va|, (r+1)*V/|Va|)`` for its index ``r`` over ``vocab_axes``, and the same ``x`` and ``targets``
(replicated over ``vocab_axes``). Per chunk: the row max is a ``pmax`` over ``Va``, the sums of
``exp`` and the target logit a ``psum`` (one all-reduce of ``[2, n]``); the input gradient is summed
over ``Va`` once at the end. ``batch_axes``: ``x``/``targets`` hold this rank's tokens; the loss total
and the token count are summed over them (the mean is over all tokens of all ranks). The weight
gradient is this rank's tokens' contribution (it is partial over ``batch_axes``, as for any weight used
by a data-parallel rank: reduce it where data-parallel gradients are reduced).

Precision: bf16/fp16 logits are upcast to float32 per chunk (as ``logits.float()`` before
``F.cross_entropy``); the loss is float32, ``dx``/``dW`` come back in the inputs' dtypes; ``dW`` is
accumulated across chunks in ``weight.dtype`` (one rounding per chunk for half types).

Padding: with ``vocab_size`` < the global V, columns ``>= vocab_size`` are masked out.
Only ``reduction`` "mean" and "sum" (the loss is a scalar; per-token losses would need the
incoming gradient before the weight gradient can be formed).
"""
from __future__ import annotations

import functools
import logging
import os

import torch

from ..errors import ShardingError
from ..mesh import Mesh
from ..mesh import collectives as C
from ..sharding.spec import P, base_axis
from ..sharding.tensor import ShardedTensor

log = logging.getLogger(__name__)

_CHUNK_ELEMS = 1 << 27  # logits elements per chunk by default (512 MB in float32)


def default_chunk(n_tokens: int, v_local: int) -> int:
    """Rows per chunk: the largest power of two whose logits hold at most 2**27 elements (at least 1, at
    most all rows). A power of two splits the usual token counts evenly, so the compiled per-chunk pieces
    see one shape."""
    cap = max(1, _CHUNK_ELEMS // max(1, v_local))
    return max(1, min(n_tokens, 1 << (cap.bit_length() - 1)))


def _half(dtype: torch.dtype) -> bool:
    return dtype in (torch.bfloat16, torch.float16)


def _upcast(logits: torch.Tensor, n_real: int) -> torch.Tensor:
    lf = logits.float() if _half(logits.dtype) else logits
    if n_real < lf.shape[1]:  # padded vocabulary columns never win
        cols = torch.arange(lf.shape[1], device=lf.device)
        lf = lf.masked_fill(cols >= n_real, float("-inf"))
    return lf


def _row_max_picked(logits, rel, hit, n_real: int):
    """``(max_v logits, logits[row, rel] where hit else 0)``, ``[n]`` each, in the accumulator dtype."""
    lf = _upcast(logits, n_real)
    picked = lf.gather(1, rel.unsqueeze(1)).squeeze(1)
    return lf.amax(1), torch.where(hit, picked, torch.zeros_like(picked))


def _sum_exp(logits, m, n_real: int):
    """``sum_v exp(logits - m)`` ``[n]``."""
    return torch.exp(_upcast(logits, n_real) - m.unsqueeze(1)).sum(1)


def _logit_grad(logits, m, se, rel, hit, row, n_real: int):
    """``(softmax - onehot(rel)) * row`` in ``logits.dtype`` (``row``: the per-token loss weight, 0 if ignored)."""
    lf = _upcast(logits, n_real)
    g = torch.exp(lf - m.unsqueeze(1)) * (row / se).unsqueeze(1)
    cols = torch.arange(lf.shape[1], device=lf.device)
    onehot = (cols.unsqueeze(0) == rel.unsqueeze(1)) & hit.unsqueeze(1)
    g = g - onehot.to(g.dtype) * row.unsqueeze(1)
    return g.to(logits.dtype)


_PIECES = {"max_picked": _row_max_picked, "sum_exp": _sum_exp, "grad": _logit_grad}


@functools.lru_cache(maxsize=None)
def _compiled(name: str) -> dict:
    """``{"fn": compiled piece or None}`` (one torch.compile per piece per process; None after a failure)."""
    try:
        return {"fn": torch.compile(_PIECES[name], dynamic=False)}
    except Exception as e:  # noqa: BLE001 - no compiler: eager pieces
        log.info("fused_linear_cross_entropy: torch.compile unavailable (%s); eager pieces", e)
        return {"fn": None}


def _piece(name: str, *args):
    """Run a per-chunk piece: compiled (one fused pass) on CUDA unless MESHPAR_FUSED_LOSS_COMPILE=0, else eager."""
    if args[0].is_cuda and os.environ.get("MESHPAR_FUSED_LOSS_COMPILE", "1") != "0":
        entry = _compiled(name)
        if entry["fn"] is not None:
            try:
                return entry["fn"](*args)
            except Exception as e:  # noqa: BLE001 - a failed compile falls back, once, with a log line
                log.warning("fused_linear_cross_entropy: compiled %s failed (%s: %s); using eager pieces", name,
                            type(e).__name__, str(e)[:200])
                entry["fn"] = None
    return _PIECES[name](*args)


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, w, t, ignore_index: int, reduction: str, chunk: int, vocab_size: int, mesh, va, ba):
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n_tok, v_loc = x2.shape[0], w.shape[0]
        acc = torch.float32 if _half(x2.dtype) else x2.dtype
        v0 = mesh.axis_index(va) * v_loc if va else 0
        n_real = max(0, min(v_loc, vocab_size - v0))  # local columns inside the real vocabulary
        t = t.long()
        valid = t != ignore_index
        count = valid.sum().to(acc)
        if ba:
            count = C.all_reduce(count, mesh, ba)
        scale = 1.0 / count.clamp_min(1) if reduction == "mean" else torch.ones((), dtype=acc, device=x2.device)
        total = torch.zeros((), dtype=acc, device=x2.device)
        dx = torch.empty_like(x2) if need_dx else None
        dw = torch.zeros_like(w) if need_dw else None
        for i in range(0, n_tok, chunk):
            xc, tc, vc = x2[i:i + chunk], t[i:i + chunk], valid[i:i + chunk]
            logits = torch.mm(xc, w.t())  # [n, V_loc], the only chunk-sized buffer besides its gradient
            rel = tc - v0
            hit = (rel >= 0) & (rel < n_real) & vc
            rel = torch.where(hit, rel, torch.zeros_like(rel))
            m, picked = _piece("max_picked", logits, rel, hit, n_real)
            if va:
                m = C.all_reduce(m, mesh, va, op="max")
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            se = _piece("sum_exp", logits, m, n_real)
            if va:
                se, picked = C.all_reduce(torch.stack([se, picked]), mesh, va).unbind(0)
            lse = m + se.log()
            total += torch.where(vc, lse - picked, torch.zeros_like(lse)).sum()
            if not (need_dx or need_dw):
                continue
            row = torch.where(vc, scale, torch.zeros_like(scale)).to(acc)
            g = _piece("grad", logits, m, se, rel, hit, row, n_real)
            del logits
            if need_dx:
                torch.mm(g, w, out=dx[i:i + chunk])
            if need_dw:
                dw.addmm_(g.t(), xc)
        if need_dx and va:
            dx = C.all_reduce(dx, mesh, va)
        if ba:
            total = C.all_reduce(total, mesh, ba)
        loss = total / count if reduction == "mean" else total
        ctx.save_for_backward(dx, dw)
        return loss

    @staticmethod
    def backward(ctx, g):
        dx, dw = ctx.saved_tensors
        return (None if dx is None else dx * g.to(dx.dtype), None if dw is None else dw * g.to(dw.dtype),
                None, None, None, None, None, None, None, None)


def fused_linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                               ignore_index: int = -100, reduction: str = "mean", chunk_size: int | None = None,
                               vocab_size: int | None = None, mesh: Mesh | None = None, vocab_axes=None,
                               batch_axes=None) -> torch.Tensor:
    """``cross_entropy(x @ weight.T, targets)`` computed in token chunks, never holding all logits.

    Args:
        x: ``[..., C]`` (plain tensor; this rank's block).
        weight: ``[V_local, C]`` (the whole ``[V, C]`` without ``vocab_axes``; else this rank's rows).
        targets: ``[...]`` (``x``'s leading shape) ids in ``[0, vocab_size)`` or ``ignore_index``.
        reduction: "mean" (over non-ignored tokens of all ``batch_axes`` ranks) or "sum".
        chunk_size: tokens per chunk (default: :func:`default_chunk`).
        vocab_size: the real vocabulary when the global V (``V_local * |vocab_axes|``) was padded.
        mesh, vocab_axes, batch_axes: the vocab-parallel / token-parallel layout (see the module doc).
    Returns:
        the scalar loss (float32 for half inputs), the same on every rank of ``mesh``.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"fused_linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    if any(isinstance(a, ShardedTensor) for a in (x, weight, targets)):
        raise ShardingError("fused_linear_cross_entropy works on local (plain) tensors; pass each rank's blocks "
                            "and the mesh axes (e.g. inside shard_map)")
    if x.ndim < 1 or weight.ndim != 2 or x.shape[-1] != weight.shape[1]:
        raise ShardingError(f"fused_linear_cross_entropy: x {tuple(x.shape)} and weight {tuple(weight.shape)} "
                            "must be [..., C] and [V, C]")
    if tuple(targets.shape) != tuple(x.shape[:-1]):
        raise ShardingError(f"fused_linear_cross_entropy: targets {tuple(targets.shape)} must be x's leading shape "
                            f"{tuple(x.shape[:-1])}")
    if x.dtype != weight.dtype:
        raise ShardingError(f"fused_linear_cross_entropy: x is {x.dtype} but weight is {weight.dtype}")
    if (vocab_axes or batch_axes) and mesh is None:
        raise ShardingError("fused_linear_cross_entropy: vocab_axes/batch_axes need the mesh")
    va = tuple(mesh.check_axes(vocab_axes)) if vocab_axes else ()
    ba = tuple(mesh.check_axes(batch_axes)) if batch_axes else ()
    v_global = weight.shape[0] * (mesh.size(va) if va else 1)
    vocab_size = v_global if vocab_size is None else int(vocab_size)
    if not 0 < vocab_size <= v_global:
        raise ShardingError(f"fused_linear_cross_entropy: vocab_size {vocab_size} must be in [1, {v_global}]")
    x2 = x.reshape(-1, x.shape[-1])
    chunk = int(chunk_size) if chunk_size else default_chunk(x2.shape[0], weight.shape[0])
    if chunk < 1:
        raise ValueError(f"fused_linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    with C.op_name("fused_linear_cross_entropy"):
        return _FusedLinearCE.apply(x2, weight, targets.reshape(-1), int(ignore_index), reduction, chunk,
                                    vocab_size, mesh, va, ba)


def sharded_fused_linear_cross_entropy(x, weight, targets, *, ignore_index: int = -100, reduction: str = "mean",
                                       chunk_size: int | None = None):
    """:func:`fused_linear_cross_entropy` on laid-out operands: the loss as a replicated ShardedTensor ``P()``.

    Layouts taken (anything else raises :class:`ShardingError` before any communication, so a caller can
    fall back to ``cross_entropy(x @ weight.T)``):

    * ``x [..., C]``: a ShardedTensor whose leading dims may be split (the token axes, zigzag included) and
      whose last dim is whole; no partial sums.
    * ``weight [V, C]``: split over the vocabulary only (``P(va, None)``, the vocab axes) or replicated.
    * ``targets [...]``: laid out as ``x``'s leading dims, or whole where ``x`` is split (a plain tensor, or a
      ShardedTensor split on a prefix of ``x``'s axes): their block is then a free local slice.
    * the vocab axes and the token axes are disjoint.

    Gradients: ``x``'s block gets its full gradient (summed over the vocab axes inside the kernel);
    ``weight``'s block gets its tokens' contribution, summed over the token axes by the usual rule
    (deferred on a data axis the parameter defers, as for any data-parallel weight).
    """
    from ..sharding.core import enter, local_in, wrap

    if not isinstance(x, ShardedTensor):
        raise ShardingError("sharded_fused_linear_cross_entropy: x must be a ShardedTensor")
    mesh = x.mesh
    nd = x.ndim
    for name, t in (("weight", weight), ("targets", targets)):
        if isinstance(t, ShardedTensor) and t.mesh is not mesh:
            raise ShardingError(f"sharded_fused_linear_cross_entropy: {name} is on another mesh")
    if x.spec.unreduced or (isinstance(weight, ShardedTensor) and weight.spec.unreduced):
        raise ShardingError("sharded_fused_linear_cross_entropy: partial sums; reduce first")
    if x.spec.axes_of(nd - 1):
        raise ShardingError(f"sharded_fused_linear_cross_entropy: x {x.spec} splits the feature dim")
    wspec = weight.spec if isinstance(weight, ShardedTensor) else P()
    if weight.ndim != 2 or wspec.axes_of(1):
        raise ShardingError(f"sharded_fused_linear_cross_entropy: weight {wspec} must be [V, C] split over V at most")
    lead = tuple(x.spec.axes_of(d) for d in range(nd - 1))
    batch_axes = tuple(a for ax in lead for a in ax)
    vocab_axes = tuple(wspec.axes_of(0))
    if {base_axis(a) for a in vocab_axes} & {base_axis(a) for a in batch_axes}:
        raise ShardingError("sharded_fused_linear_cross_entropy: vocab and token axes overlap")
    if tuple(targets.shape) != tuple(x.shape[:-1]):
        raise ShardingError(f"sharded_fused_linear_cross_entropy: targets {tuple(targets.shape)} must be x's leading "
                            f"shape {tuple(x.shape[:-1])}")
    if isinstance(targets, ShardedTensor) and targets.spec.unreduced:
        raise ShardingError("sharded_fused_linear_cross_entropy: targets are a partial sum")
    # the targets' block in x's token layout: equal specs, or a free local slice where the targets are
    # whole (e.g. a sequence-parallel plan whose targets are split over the batch only); else refused
    t_loc = local_in(targets, P(*[ax or None for ax in lead]), nd - 1, mesh)
    if x.dtype != weight.dtype:
        raise ShardingError(f"sharded_fused_linear_cross_entropy: x is {x.dtype} but weight is {weight.dtype}")
    x_loc = enter(x)                                    # dx is complete: the kernel sums it over the vocab axes
    w_loc = enter(weight, vary=batch_axes) if isinstance(weight, ShardedTensor) else weight
    plain_batch = tuple(dict.fromkeys(base_axis(a) for a in batch_axes))
    loss = fused_linear_cross_entropy(x_loc, w_loc, t_loc, ignore_index=ignore_index, reduction=reduction,
                                      chunk_size=chunk_size, mesh=mesh, vocab_axes=vocab_axes or None,
                                      batch_axes=plain_batch or None)
    return wrap(loss, P(), mesh, ())


def try_fused_linear_cross_entropy(x, weight, targets, *, ignore_index: int = -100) -> torch.Tensor | None:
    """The chunked loss head where it applies, else None (the caller computes the logits and the loss).

    Applies to plain ``x``/``weight``/``targets`` of one dtype, and to the ShardedTensor layouts of
    :func:`sharded_fused_linear_cross_entropy`; never under autocast (it does not cast)."""
    if x.dtype != weight.dtype or torch.is_autocast_enabled(x.device.type):
        return None
    if not any(isinstance(t, ShardedTensor) for t in (x, weight, targets)):
        return fused_linear_cross_entropy(x, weight, targets, ignore_index=ignore_index)
    if not isinstance(x, ShardedTensor):
        return None
    try:
        return sharded_fused_linear_cross_entropy(x, weight, targets, ignore_index=ignore_index)
    except ShardingError:
        return None


__all__ = ["fused_linear_cross_entropy", "sharded_fused_linear_cross_entropy", "try_fused_linear_cross_entropy",
           "default_chunk"]
