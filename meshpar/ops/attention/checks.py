"""Input validation for sequence-parallel attention. Everything here runs before any collective."""
from __future__ import annotations

from typing import Any

import torch

from ...errors import ShardingError

SUPPORTED = ("supported: attn_mask=None with is_causal=True or False, dropout_p=0.0, "
             "q/k/v of shape [B, H, S, D] with equal B and D, and equal H (or enable_gqa=True with "
             "k/v heads dividing q heads)")


def check_call(attn_mask: Any = None, dropout_p: float = 0.0) -> None:
    """Reject SDPA features the sequence-parallel kernels do not implement."""
    if attn_mask is not None:
        raise ShardingError("sequence-parallel attention does not support attn_mask (a dense mask would be "
                            f"sequence-sharded too); use is_causal=True for causal masking. {SUPPORTED}")
    if dropout_p:
        raise ShardingError(f"sequence-parallel attention does not support dropout_p={dropout_p}; {SUPPORTED}")


def check_local(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, sp: int, causal: bool, balanced: bool,
                mode: str, enable_gqa: bool = False) -> None:
    """Validate local blocks ``q [B, H, Sq_loc, D]``, ``k, v [B, H, Sk_loc, D]`` (same on every rank).

    Raises :class:`ShardingError` naming the dimension and the fix.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            raise ShardingError(f"sequence-parallel attention expects {name} of shape [B, H, S, D] "
                                f"(sequence on dim 2), got {getattr(t, 'shape', type(t))}")
    if k.shape != v.shape:
        raise ShardingError(f"k {tuple(k.shape)} and v {tuple(v.shape)} local blocks differ; they must match")
    if enable_gqa:
        if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
            raise ShardingError(f"enable_gqa: q heads (dim 1) {q.shape[1]} must be a multiple of k/v heads "
                                f"{k.shape[1]}")
    for d, what in ((0, "batch"), (1, "heads"), (3, "head dim")):
        if d == 1 and enable_gqa:
            continue
        if q.shape[d] != k.shape[d]:
            raise ShardingError(f"q and k differ on dim {d} ({what}): {q.shape[d]} vs {k.shape[d]}; {SUPPORTED}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ShardingError(f"q/k/v must share dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} on "
                            f"{q.device}/{k.device}/{v.device}")
    if causal and q.shape[2] != k.shape[2]:
        raise ShardingError(f"causal sequence-parallel attention needs equal q and k/v sequence blocks (dim 2), "
                            f"got {q.shape[2]} vs {k.shape[2]}")
    if balanced:
        for name, t in (("q", q), ("k", k)):
            if t.shape[2] % 2:
                raise ShardingError(
                    f"balanced layout: the local {name} sequence block (dim 2) holds two equal chunks, but its "
                    f"length {t.shape[2]} is odd; the global sequence must be a multiple of 2*sp = {2 * sp} "
                    "(pad it, e.g. meshpar.ops.attention.pad_to_multiple) or use the contiguous layout")
    if mode == "all_to_all":
        for name, t in (("q", q), ("k/v", k)):
            if t.shape[1] % sp:
                raise ShardingError(f"all-to-all (Ulysses) attention splits the heads (dim 1) over the {sp} sequence "
                                    f"ranks, but {name} heads = {t.shape[1]} is not divisible by {sp}; use "
                                    "mode='ring' or change heads")
