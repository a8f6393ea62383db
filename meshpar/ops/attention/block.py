"""Attention on one (q block, k/v block) pair, returning the output *and* its log-sum-exp.

Shapes: ``q [B, H, Sq, D]``, ``k, v [B, H, Sk, D]`` -> ``out [B, H, Sq, D]``, ``lse [B, H, Sq]``
(natural log of the softmax denominator of each query row, scale included).

Kernels (``impl``):

* ``"math"``: plain torch, any dtype (float64 in tests); scores are materialized.
* ``"cpu_fused"``: ``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward.
* ``"flash"``: ``aten._scaled_dot_product_flash_attention`` (CUDA, fp16/bf16, D <= 256).
* ``"cudnn"``: ``aten._scaled_dot_product_cudnn_attention`` (CUDA, fp16/bf16): about 1.9x faster
  than ``"flash"`` (FlashAttention-2) on H100/H200 for long blocks. Experimental: blocks are made
  contiguous, the LSE is passed ``[B, H, Sq, 1]``. Checked against float64 by ``tests/test_gpu.py``.
  ``"auto"`` picks it for fp16/bf16 with head dim <= 128 on Hopper (sm90+), then ``"flash"``.
* ``"efficient"``: ``aten._scaled_dot_product_efficient_attention`` (CUDA, **fp32 only**). Its
  bf16/fp16 backward gives wrong dQ/dK (relative error 0.1-0.6, NaN for some layouts) when handed
  the merged log-sum-exp of a row split over several blocks (measured on an H200 with torch 2.11,
  ``tests/test_gpu.py``), so it is refused for half types; dV is right, the forward is right.

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


def _cudnn_ok(device: torch.device) -> bool:
    """cuDNN's fused attention is enabled and the GPU is Hopper or newer (where it was checked)."""
    return torch.backends.cuda.cudnn_sdp_enabled() and torch.cuda.get_device_capability(device) >= (9, 0)


def select_impl(q: torch.Tensor, requested: str = "auto") -> str:
    """The kernel to use for blocks like ``q``: ``requested`` unless ``"auto"``."""
    if requested != "auto":
        if requested in ("flash", "efficient", "cudnn") and not q.is_cuda:
            raise ValueError(f"block_impl={requested!r} needs CUDA tensors; got {q.device}")
        if requested == "efficient" and q.dtype in (torch.float16, torch.bfloat16):
            raise ValueError(f"block_impl='efficient' with {q.dtype}: that kernel's half-precision backward gives "
                             "wrong dQ/dK with a merged log-sum-exp; use 'flash' (head dim % 8 == 0, <= 256), "
                             "'math', or float32")
        return requested
    if q.is_cuda:
        d = q.shape[-1]
        if q.dtype in (torch.float16, torch.bfloat16) and d % 8 == 0:
            if d <= 128 and _cudnn_ok(q.device):
                return "cudnn"
            if d <= 256:
                return "flash"
        if q.dtype == torch.float32:
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
    if impl == "cudnn":
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        r = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
        # (out, lse [B, H, Sq, 1], cum_seq_q, cum_seq_k, max_q, max_k, philox_seed, philox_offset, debug_mask)
        return r[0], r[1].reshape(r[1].shape[:3]), BlockMeta((r[2], r[3], r[6], r[7]))
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
    if impl == "cudnn":
        cum_q, cum_k, seed, offset = meta.extras if meta is not None and meta.extras else (None, None, None, None)
        if seed is None:
            seed = offset = torch.empty(0, dtype=torch.int64, device=q.device)
        q, k, v, out, dout = (t.contiguous() for t in (q, k, v, out, dout))
        lse4 = lse.float().contiguous().unsqueeze(-1)
        r = aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse4, seed, offset, None, cum_q, cum_k, q.shape[-2], k.shape[-2], 0.0, causal,
            scale=scale)
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
