"""Ring attention's merge and gradient accumulation on CUDA (the ``ring_merge`` kernel).

:func:`merge_` equals ``meshpar.ops.attention.block.merge_`` (in-place log-sum-exp merge into fp32
accumulators) and :func:`grad_acc_` equals ``dq_acc += d_q; dk_acc += reduce_kv(d_k, rep);
dv_acc += reduce_kv(d_v, rep)`` (the GQA sum is done in fp32 here, in the gradient dtype by the torch
path: equal up to that rounding). Callers check :func:`merge_applies` / :func:`grad_applies` first.
"""
from __future__ import annotations

import torch

from . import load
from ._util import DTYPE_CODE, i64_array, stream_of

_HALF_OR_F32 = (torch.float32, torch.bfloat16, torch.float16)


def _acc_ok(t: torch.Tensor) -> bool:
    return t.is_cuda and t.dtype == torch.float32 and t.stride(-1) == 1


def merge_applies(out_acc: torch.Tensor, lse_acc: torch.Tensor, o: torch.Tensor, l: torch.Tensor) -> bool:
    return (_acc_ok(out_acc) and lse_acc.is_cuda and lse_acc.dtype == torch.float32 and out_acc.ndim == 4
            and o.dtype in _HALF_OR_F32 and o.shape == out_acc.shape and l.shape == lse_acc.shape
            and load("ring_merge") is not None)


def merge_(out_acc: torch.Tensor, lse_acc: torch.Tensor, o: torch.Tensor, l: torch.Tensor) -> None:
    """In place: ``L = logaddexp(lse_acc, l); out_acc = out_acc*exp(lse_acc-L) + o*exp(l-L); lse_acc = L``.

    ``out_acc [B, H, S, D]``, ``lse_acc [B, H, S]`` fp32 (views allowed, last stride 1), ``o`` like
    ``out_acc`` (fp32/bf16/fp16), ``l [B, H, S]``.
    """
    lib = load("ring_merge")
    o = o.contiguous()
    l = l.to(torch.float32)
    B, H, S, D = out_acc.shape
    with torch.cuda.device(out_acc.device):
        lib.call("meshpar_ring_merge", out_acc.data_ptr(), lse_acc.data_ptr(), o.data_ptr(), l.data_ptr(),
                 DTYPE_CODE[o.dtype], D, i64_array((B, H, S)), i64_array(out_acc.stride()[:3]),
                 i64_array(lse_acc.stride()), i64_array(l.stride()), stream_of(out_acc))


def grad_applies(dq_acc, d_q, dk_acc, dv_acc, d_k, d_v, rep: int) -> bool:
    return (all(_acc_ok(t) for t in (dq_acc, dk_acc, dv_acc)) and d_q.dtype in _HALF_OR_F32
            and d_q.dtype == d_k.dtype == d_v.dtype and d_q.shape == dq_acc.shape and d_k.shape == d_v.shape
            and dk_acc.shape == dv_acc.shape and d_k.shape[1] == dk_acc.shape[1] * rep
            and d_k.shape[0] == dk_acc.shape[0] and d_k.shape[2:] == dk_acc.shape[2:]
            and d_q.shape[1] == d_k.shape[1] and d_q.shape[-1] == d_k.shape[-1]
            and load("ring_merge") is not None)


def grad_acc_(dq_acc, d_q, dk_acc, dv_acc, d_k, d_v, rep: int) -> None:
    """In place: ``dq_acc += d_q``, ``dk_acc += sum of d_k's rep copies per K/V head`` (GQA), same for dv."""
    lib = load("ring_merge")
    d_q, d_k, d_v = d_q.contiguous(), d_k.contiguous(), d_v.contiguous()
    B, H, Sq, D = d_q.shape
    Hkv, Sk = dk_acc.shape[1], dk_acc.shape[2]
    strides = (*dq_acc.stride()[:3], *dk_acc.stride()[:3], *dv_acc.stride()[:3])
    with torch.cuda.device(dq_acc.device):
        lib.call("meshpar_ring_grad_acc", dq_acc.data_ptr(), d_q.data_ptr(), dk_acc.data_ptr(), dv_acc.data_ptr(),
                 d_k.data_ptr(), d_v.data_ptr(), int(rep), DTYPE_CODE[d_q.dtype],
                 i64_array((B, H, Hkv, Sq, Sk, D)), i64_array(strides), stream_of(dq_acc))
