"""AdamW on host-resident float32 tensors with the JIT-built OpenMP kernel (``cuda_ops.cpu_adamw``).

The primitive is :func:`adamw_step_`, one in-place step on flat (or any contiguous) tensors, for the
offload path: the chunk manager keeps fp32 master chunks, their moments and gradients on the host and
calls it per chunk, optionally writing the updated parameters as bf16 into a (pinned) buffer that is
then copied to the GPU. :class:`CPUAdamW` wraps it as a ``torch.optim.Optimizer``.

Results equal ``torch.optim.AdamW`` (float32, ``amsgrad=False``, ``maximize=False``) within float32
rounding: the kernel does the same operations in the same order (``tests/test_cuda_ops.py``). Without
the kernel (no compiler, ``MESHPAR_DISABLE_KERNELS=cpu_adamw``) the same step runs as torch ops.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

import cuda_ops


def _check(name: str, t: torch.Tensor, n: int, dtypes: tuple[torch.dtype, ...]) -> None:
    if t.device.type != "cpu" or t.dtype not in dtypes or not t.is_contiguous() or t.numel() != n:
        raise ValueError(f"adamw_step_: {name} must be a contiguous CPU tensor of {n} elements with dtype in "
                         f"{[str(d) for d in dtypes]}; got {t.device} {t.dtype} {tuple(t.shape)} "
                         f"contiguous={t.is_contiguous()}")


def _torch_step(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step, bf16_out) -> None:
    """The fallback: torch.optim.AdamW's single-tensor step, op for op."""
    g = grad.float() if grad.dtype != torch.float32 else grad
    if weight_decay != 0.0:
        param.mul_(1.0 - lr * weight_decay)
    exp_avg.lerp_(g, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    step_size = lr / (1.0 - beta1 ** step)
    bc2_sqrt = math.sqrt(1.0 - beta2 ** step)
    denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)
    if bf16_out is not None:
        bf16_out.copy_(param.view(bf16_out.shape))


def adamw_step_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
                bf16_out: torch.Tensor | None = None, *, num_threads: int | None = None) -> None:
    """One AdamW step, in place, on contiguous CPU tensors of ``n`` elements (any shape).

    Args:
        param, exp_avg, exp_avg_sq: float32, updated in place.
        grad: float32 or bfloat16.
        lr, beta1, beta2, eps, weight_decay: as ``torch.optim.AdamW`` (decoupled decay ``p *= 1 - lr*wd``).
        step: the step number after this update (1 for the first step): bias corrections use it.
        bf16_out: optional bfloat16 tensor of ``n`` elements receiving the updated parameters
            (round to nearest even, as ``param.to(torch.bfloat16)``). It may be ``grad`` itself (a bf16
            gradient overwritten by the new parameters, element for element).
        num_threads: OpenMP threads for the kernel (default: torch's intra-op thread count).
    """
    n = param.numel()
    _check("param", param, n, (torch.float32,))
    _check("grad", grad, n, (torch.float32, torch.bfloat16))
    _check("exp_avg", exp_avg, n, (torch.float32,))
    _check("exp_avg_sq", exp_avg_sq, n, (torch.float32,))
    if bf16_out is not None:
        _check("bf16_out", bf16_out, n, (torch.bfloat16,))
    if step < 1:
        raise ValueError(f"adamw_step_: step must be >= 1 (the count including this step), got {step}")
    lib = cuda_ops.load("cpu_adamw")
    if lib is None:
        _torch_step(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step, bf16_out)
        return
    step_size = lr / (1.0 - beta1 ** step)
    bc2_sqrt = math.sqrt(1.0 - beta2 ** step)
    lib.call("meshpar_adamw_f32", param.data_ptr(), grad.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(),
             None if bf16_out is None else bf16_out.data_ptr(), n, int(grad.dtype == torch.bfloat16),
             1.0 - lr * weight_decay, 1.0 - beta1, beta2, 1.0 - beta2, -step_size, bc2_sqrt, eps,
             int(num_threads or torch.get_num_threads()))


class CPUAdamW(torch.optim.Optimizer):
    """AdamW for float32 CPU parameters through :func:`adamw_step_` (kernel or exact torch fallback).

    Same hyper-parameters and state names as ``torch.optim.AdamW`` (``step``, ``exp_avg``,
    ``exp_avg_sq``), so its state dict loads into either. ``bf16_copies`` optionally maps a parameter to a
    bfloat16 tensor of the same shape that receives its updated value every step (the device copy's
    staging buffer).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *,
                 bf16_copies: dict[torch.Tensor, torch.Tensor] | None = None):
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"CPUAdamW: invalid hyper-parameters lr={lr} betas={betas} eps={eps} "
                             f"weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self._bf16 = {id(p): t for p, t in (bf16_copies or {}).items()}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("CPUAdamW does not support sparse gradients")
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                st["step"] += 1
                out = self._bf16.get(id(p))
                adamw_step_(p.data, p.grad.contiguous(), st["exp_avg"], st["exp_avg_sq"], group["lr"], b1, b2,
                            group["eps"], group["weight_decay"], int(st["step"].item()), out)
        return loss
