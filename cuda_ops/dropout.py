"""Layout-independent hash dropout on CUDA (the ``dropout`` kernel), with the torch path as fallback.

:func:`hash_dropout` ``(x, offsets, p, seed, site)`` gives exactly
``meshpar.ops.dropout.dropout_local(x, offsets, p, seed, site)`` (same mask, same rounding) in one pass,
and its backward recomputes the mask instead of saving it. :func:`bias_dropout_add` fuses
``residual + dropout_local(x + bias, ...)``. Both fall back to the torch ops when the kernel does not
apply (CPU tensors, > 8 dims, kernel unavailable or disabled).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from . import load
from ._util import DTYPE_CODE, i64_array, ptr, ptr_array, stream_of

_M32 = 0xFFFFFFFF


def _fmix(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def stream_hash(seed: int, site: int) -> int:
    """The hash state after (seed, site), as ``meshpar.ops.dropout.uniform`` builds it before the coordinates."""
    h = 0x9E3779B9
    for w in (seed & _M32, (seed >> 32) & _M32, site & _M32, (site >> 32) & _M32):
        h = _fmix(((h * 0x01000193) & _M32) ^ w)
    return h


def threshold(p: float) -> int:
    """``k >= threshold(p)`` <=> ``k * 2**-24 >= p`` for integers ``k`` in [0, 2**24) (exact: p * 2**24 is exact)."""
    return math.ceil(p * (1 << 24))


def applies(x: torch.Tensor) -> bool:
    """The kernel can run on ``x`` (and is built)."""
    return x.is_cuda and x.dtype in DTYPE_CODE and 1 <= x.ndim <= 8 and load("dropout") is not None


def _launch(x, bias, res, offsets, p, seed, site) -> torch.Tensor:
    lib = load("dropout")
    x = x.contiguous()
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    keep = []  # device position tensors must outlive the launch
    offs, pos = [], []
    for d, o in enumerate(offsets):
        if isinstance(o, torch.Tensor):
            t = o.to(device=x.device, dtype=torch.int64).contiguous()
            if t.numel() != x.shape[d]:
                raise ValueError(f"hash_dropout: positions of dim {d} have {t.numel()} entries, the block {x.shape[d]}")
            keep.append(t)
            offs.append(0)
            pos.append(t.data_ptr())
        else:
            offs.append(int(o))
            pos.append(None)
    with torch.cuda.device(x.device):
        lib.call("meshpar_hash_dropout", x.data_ptr(), ptr(bias), ptr(res), out.data_ptr(), DTYPE_CODE[x.dtype],
                 x.numel(), i64_array(x.shape), i64_array(offs), ptr_array(pos), x.ndim, stream_hash(seed, site),
                 threshold(p), 1.0 / (1.0 - p), stream_of(x))
    return out


class _HashDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, res, offsets, p, seed, site):
        ctx.args = (offsets, p, seed, site)
        ctx.has_bias = bias is not None
        ctx.bias_shape = None if bias is None else bias.shape
        return _launch(x, None if bias is None else bias.contiguous(), None if res is None else res.contiguous(),
                       offsets, p, seed, site)

    @staticmethod
    def backward(ctx, g):
        offsets, p, seed, site = ctx.args
        dx = _launch(g, None, None, offsets, p, seed, site) if ctx.needs_input_grad[0] or ctx.has_bias else None
        db = dx.reshape(-1, dx.shape[-1]).sum(0).reshape(ctx.bias_shape) if ctx.needs_input_grad[1] else None
        dres = g if ctx.needs_input_grad[2] else None
        return (dx if ctx.needs_input_grad[0] else None), db, dres, None, None, None, None


def hash_dropout(x: torch.Tensor, offsets: Sequence, p: float, seed: int, site: int = 0) -> torch.Tensor:
    """``dropout_local(x, offsets, p, seed, site)`` through the kernel (caller checks :func:`applies`)."""
    return _HashDropout.apply(x, None, None, tuple(offsets), float(p), int(seed), int(site))


def bias_dropout_add(x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor, offsets: Sequence,
                     p: float, seed: int, site: int = 0) -> torch.Tensor:
    """``residual + dropout_local(x + bias, offsets, p, seed, site)`` (``bias [L]`` along the last dim).

    One kernel when it applies (``x``, ``bias``, ``residual`` CUDA, same dtype and shape), else the torch ops.
    """
    ok = (applies(x) and residual.shape == x.shape and residual.dtype == x.dtype and residual.device == x.device
          and (bias is None or (bias.ndim == 1 and bias.shape[0] == x.shape[-1] and bias.dtype == x.dtype
                                and bias.device == x.device)))
    if not ok:
        from meshpar.ops.dropout import dropout_local
        return residual + dropout_local(x if bias is None else x + bias, offsets, p, seed, site)
    return _HashDropout.apply(x, bias, residual, tuple(offsets), float(p), int(seed), int(site))
