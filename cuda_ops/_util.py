"""Helpers of the Python wrappers: dtype codes, the current CUDA stream, ctypes arrays."""
from __future__ import annotations

import ctypes
from typing import Sequence

import torch

DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}


def stream_of(t: torch.Tensor) -> int:
    """The raw ``cudaStream_t`` of the current stream on ``t``'s device."""
    return torch.cuda.current_stream(t.device).cuda_stream


def i64_array(vals: Sequence[int]):
    return (ctypes.c_int64 * max(1, len(vals)))(*[int(v) for v in vals])


def ptr_array(ptrs: Sequence[int | None]):
    return (ctypes.c_void_p * max(1, len(ptrs)))(*ptrs)


def ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()
