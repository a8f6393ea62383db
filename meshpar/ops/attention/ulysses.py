"""All-to-all (Ulysses) attention: sequence-sharded -> head-sharded, full-sequence attention, back.

Local blocks ``q, k, v [B, H, S/sp, D]`` -> one all-to-all of the stacked q/k/v gives
``[B, H/sp, S, D]`` on every rank (heads split, sequence whole) -> local SDPA -> one all-to-all of
the output back to ``[B, H, S/sp, D]``. Bytes received per rank: ``(sp-1)/sp`` of 3 local blocks
forward in and 1 out; the backward is the same pattern reversed. In the balanced layout the
gathered sequence is in zigzag order and is reordered locally (a gather, no communication).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...mesh import Mesh
from ...mesh import autograd as A
from ...mesh import collectives as C
from .layout import zigzag_index


def all_to_all_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mesh: Mesh, axes, *, causal: bool,
                         balanced: bool, scale: float, enable_gqa: bool = False) -> torch.Tensor:
    """Ulysses attention on validated local blocks; returns ``[B, H, Sq_loc, D]`` like ``q``."""
    sp = mesh.size(axes)
    with C.op_name("all_to_all_attention"):
        if q.shape == k.shape:
            qkv = A.all_to_all(torch.stack([q, k, v]), mesh, axes, split_dim=2, concat_dim=3)
            qh, kh, vh = qkv.unbind(0)
        else:
            qh = A.all_to_all(q, mesh, axes, split_dim=1, concat_dim=2)
            kv = A.all_to_all(torch.stack([k, v]), mesh, axes, split_dim=2, concat_dim=3)
            kh, vh = kv.unbind(0)
        if balanced and causal:
            s = qh.shape[2]
            fwd = zigzag_index(s, sp, inverse=True, device=qh.device)
            qh, kh, vh = (t.index_select(2, fwd) for t in (qh, kh, vh))
        gqa = {"enable_gqa": True} if kh.shape[1] != qh.shape[1] else {}
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal, scale=scale, **gqa)
        if balanced and causal:
            o = o.index_select(2, zigzag_index(o.shape[2], sp, device=o.device))
        return A.all_to_all(o, mesh, axes, split_dim=2, concat_dim=1)
