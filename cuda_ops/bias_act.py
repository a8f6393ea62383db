"""Fused bias + GeLU on CUDA (the ``bias_act`` kernel); ``F.gelu(x + bias)`` otherwise.

Forward one pass (``x``, ``bias`` -> ``out``), backward one pass (``dy``, ``x``, ``bias`` -> ``dx``) plus
torch's row sum for the bias gradient; ``x + bias`` is neither stored nor saved. Same rounding as the
eager path (``x + bias`` rounded to the dtype, torch's GeLU formulas in float32 / float64).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import load
from ._util import DTYPE_CODE, stream_of


def applies(x: torch.Tensor, bias: torch.Tensor) -> bool:
    return (x.is_cuda and x.dtype in DTYPE_CODE and bias.dtype == x.dtype and bias.device == x.device
            and bias.ndim == 1 and x.ndim >= 1 and x.shape[-1] == bias.shape[0] and load("bias_act") is not None)


class _BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, tanh: bool):
        lib = load("bias_act")
        x, bias = x.contiguous(), bias.contiguous()
        out = torch.empty_like(x)
        with torch.cuda.device(x.device):
            lib.call("meshpar_bias_gelu_fwd", x.data_ptr(), bias.data_ptr(), out.data_ptr(), DTYPE_CODE[x.dtype],
                     x.numel(), x.shape[-1], int(tanh), stream_of(x))
        ctx.save_for_backward(x, bias)
        ctx.tanh = tanh
        return out

    @staticmethod
    def backward(ctx, g):
        x, bias = ctx.saved_tensors
        lib = load("bias_act")
        g = g.contiguous()
        dx = torch.empty_like(x)
        with torch.cuda.device(x.device):
            lib.call("meshpar_bias_gelu_bwd", g.data_ptr(), x.data_ptr(), bias.data_ptr(), dx.data_ptr(),
                     DTYPE_CODE[x.dtype], x.numel(), x.shape[-1], int(ctx.tanh), stream_of(x))
        db = dx.reshape(-1, dx.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return (dx if ctx.needs_input_grad[0] else None), db, None


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``F.gelu(x + bias, approximate=approximate)`` with ``bias [L]`` along the last dim of ``x [..., L]``."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"bias_gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    if not applies(x, bias):
        return F.gelu(x + bias, approximate=approximate)
    return _BiasGelu.apply(x, bias, approximate == "tanh")
