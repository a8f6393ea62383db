"""Attention on one (q block, k/v block) pair, returning the output *and* its log-sum-exp.

Shapes: ``q [B, H, Sq, D]``, ``k, v [B, H, Sk, D]`` -> ``out [B, H, Sq, D]``, ``lse [B, H, Sq]``
(natural log of the softmax denominator of each query row, scale included).

Kernels (``impl``):

* ``"math"``: plain torch, any dtype (float64 in tests); scores are materialized.
* ``"cpu_fused"``: ``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward.
* ``"flash"``: ``aten._scaled_dot_product_flash_attention`` (CUDA, fp16/bf16, D <= 256).
* ``"efficient"``: ``aten._scaled_dot_product_efficient_attention`` (CUDA, fp32/fp16/bf16).

``causal`` means the top-left aligned mask of a square block (query ``i`` sees keys ``<= i``); the
ring only asks for it on diagonal blocks, where ``Sq == Sk``.

Backward (:func:`block_backward`) takes the *final* merged ``out`` and ``lse`` of the query rows
(not the block's own): with those, the FlashAttention backward formulas give exactly this
block's contribution to dQ, dK and dV, so partial results never need rescaling.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

aten = torch.ops.aten


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def select_impl(q: torch.Tensor, requested: str = "auto") -> str:
    """The kernel to use for blocks like ``q``: ``requested`` unless ``"auto"``."""
    if requested != "auto":
        if requested in ("flash", "efficient") and not q.is_cuda:
            raise ValueError(f"block_impl={requested!r} needs CUDA tensors; got {q.device}")
        return requested
    if q.is_cuda:
        if q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256:
            return "flash"
        if q.dtype in (torch.float16, torch.bfloat16, torch.float32):
            return "efficient"
    return "math"


@dataclasses.dataclass
class BlockMeta:
    """Kernel outputs a fused backward needs besides out/lse (random state; unused without dropout)."""

    extras: tuple[Any, ...] = ()


def _causal_mask(sq: int, sk: int, device: torch.device) -> torch.Tensor:
    """True where query i must NOT see key j (j > i), top-left aligned."""
    return torch.ones(sq, sk, dtype=torch.bool, device=device).triu(1)


def block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
                  impl: str) -> tuple[torch.Tensor, torch.Tensor, BlockMeta]:
    """``(out, lse, meta)`` for one block. ``out`` is in the accumulator dtype for ``"math"`` and in
    ``q.dtype`` for the fused kernels; ``lse`` is float32 (float64 for float64 inputs)."""
    if impl == "math":
        acc = acc_dtype(q.dtype)
        s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
        if causal:
            s = s.masked_fill(_causal_mask(s.shape[-2], s.shape[-1], s.device), float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse.unsqueeze(-1))
        return torch.matmul(p, v.to(acc)), lse, BlockMeta()
    if impl == "cpu_fused":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return out, lse, BlockMeta()
    if impl == "flash":
        r = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        # (out, lse, cum_seq_q, cum_seq_k, max_q, max_k, rng_state, unused, debug_mask)
        return r[0], r[1], BlockMeta((r[2], r[3], r[6], r[7]))
    if impl == "efficient":
        out, lse, seed, offset = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal,
                                                                                  scale=scale)
        return out, lse[..., : q.shape[-2]], BlockMeta((seed, offset))
    raise ValueError(f"unknown attention block impl {impl!r}")


def block_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, *, causal: bool, scale: float, impl: str, meta: BlockMeta | None = None,
                   delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This block's ``(dq, dk, dv)`` given the final ``out``/``lse`` of its query rows.

    ``dout, out [B, H, Sq, D]``, ``lse [B, H, Sq]``. ``delta = rowsum(dout * out)`` ``[B, H, Sq]``
    may be passed precomputed (``"math"`` only). Results are in the accumulator dtype for
    ``"math"`` and in ``q.dtype`` for the fused kernels.
    """
    if impl == "math":
        acc = acc_dtype(q.dtype)
        qa, ka, va, da = q.to(acc), k.to(acc), v.to(acc), dout.to(acc)
        if delta is None:
            delta = (da * out.to(acc)).sum(-1)
        s = torch.matmul(qa, ka.transpose(-1, -2)) * scale
        if causal:
            s = s.masked_fill(_causal_mask(s.shape[-2], s.shape[-1], s.device), float("-inf"))
        p = torch.exp(s - lse.to(acc).unsqueeze(-1))
        dv = torch.matmul(p.transpose(-1, -2), da)
        ds = p * (torch.matmul(da, va.transpose(-1, -2)) - delta.to(acc).unsqueeze(-1))
        dq = torch.matmul(ds, ka) * scale
        dk = torch.matmul(ds.transpose(-1, -2), qa) * scale
        return dq, dk, dv
    out = out.to(q.dtype)
    dout = dout.to(q.dtype)
    if impl == "cpu_fused":
        return tuple(aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, scale=scale))
    if impl == "flash":
        cum_q, cum_k, seed, offset = meta.extras if meta is not None and meta.extras else (None, None, None, None)
        if seed is None:
            seed = offset = torch.empty(0, dtype=torch.int64, device=q.device)
        r = aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse.float().contiguous(), cum_q, cum_k, q.shape[-2], k.shape[-2], 0.0, causal,
            seed, offset, scale=scale)
        return r[0], r[1], r[2]
    if impl == "efficient":
        seed, offset = meta.extras if meta is not None and meta.extras else (None, None)
        if seed is None:
            seed = offset = torch.empty(0, dtype=torch.int64, device=q.device)
        sq = q.shape[-2]
        pad = (-sq) % 32  # the kernel's LSE rows are padded to a multiple of 32
        lse_p = torch.nn.functional.pad(lse.float(), (0, pad)).contiguous()
        r = aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, None, out, lse_p, seed, offset, 0.0, [True, True, True, False], causal, scale=scale)
        return r[0], r[1], r[2]
    raise ValueError(f"unknown attention block impl {impl!r}")


def merge_(out_acc: torch.Tensor, lse_acc: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Exact in-place merge of a partial result into the accumulators (views are fine).

    With ``L = logaddexp(lse_acc, lse)``: ``out_acc <- out_acc*exp(lse_acc-L) + out*exp(lse-L)`` and
    ``lse_acc <- L``. Shapes ``[B, H, S, D]`` and ``[B, H, S]``; every row must have a finite
    ``lse_acc`` or ``lse`` (the ring's first block covers every row).
    """
    lse = lse.to(lse_acc.dtype)
    new = torch.logaddexp(lse_acc, lse)
    out_acc.mul_(torch.exp(lse_acc - new).unsqueeze(-1))
    out_acc.add_(out.to(out_acc.dtype) * torch.exp(lse - new).unsqueeze(-1))
    lse_acc.copy_(new)


def expand_kv(t: torch.Tensor, rep: int) -> torch.Tensor:
    """GQA: ``[B, H_kv, S, D]`` -> ``[B, H_kv*rep, S, D]`` (q head ``h`` uses K/V head ``h // rep``)."""
    return t if rep == 1 else t.repeat_interleave(rep, dim=1)


def reduce_kv(g: torch.Tensor, rep: int) -> torch.Tensor:
    """The adjoint of :func:`expand_kv`: sum the gradients of each K/V head's ``rep`` copies."""
    return g if rep == 1 else g.unflatten(1, (-1, rep)).sum(2)


def default_scale(head_dim: int, scale: float | None) -> float:
    """``scale`` or ``1/sqrt(head_dim)`` (SDPA's default)."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
