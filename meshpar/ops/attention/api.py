"""Sequence-parallel attention on local blocks (the functions the SDPA rule and models call)."""
from __future__ import annotations

import torch

from ...mesh import Mesh, current_mesh
from .block import default_scale, select_impl
from .checks import check_local
from .options import current_options
from .ring import RingAttention
from .ulysses import all_to_all_attention


def sp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mesh: Mesh | None = None, axis="sp", *,
                 causal: bool = False, scale: float | None = None, mode: str | None = None,
                 balanced: bool = False, block_impl: str | None = None,
                 enable_gqa: bool = False) -> torch.Tensor:
    """Attention of sequence-sharded local blocks; differentiable.

    Args:
        q: ``[B, H, Sq/sp, D]`` this rank's query block(s).
        k, v: ``[B, H, Sk/sp, D]`` this rank's key/value block(s) (``[B, H_kv, Sk/sp, D]`` with
            ``enable_gqa``; the ring then carries the un-repeated K/V heads).
        mesh, axis: the ring: a mesh axis name (or tuple of names, major to minor) over which dim 2
            is sharded. The mesh defaults to the ``with mesh:`` one.
        causal: causal mask over *global* positions (needs ``Sq == Sk``).
        scale: softmax scale, default ``1/sqrt(D)``.
        mode, block_impl: override :func:`~meshpar.ops.attention.sequence_parallel`.
        balanced: the blocks are in the zigzag layout (rank ``r`` holds chunks ``r`` and
            ``2sp-1-r``: what ``shard`` gives for a ``meshpar.Zigzag(axis)`` spec). Local blocks
            carry no spec, so model code says it here; the SDPA rule reads it from the spec.

    Returns:
        ``[B, H, Sq/sp, D]``, this rank's output rows, in the same layout as ``q``.

    Every rank of ``axis`` must call this with equally shaped blocks. Bad input raises
    :class:`~meshpar.errors.ShardingError` before any communication.
    """
    mesh = current_mesh(mesh)
    axes = mesh.check_axes(axis)
    opts = current_options()
    mode = opts.mode if mode is None else mode
    balanced = bool(balanced)
    block_impl = opts.block_impl if block_impl is None else block_impl
    if mode not in ("ring", "all_to_all"):
        raise ValueError(f"mode must be 'ring' or 'all_to_all', got {mode!r}")
    sp = mesh.size(axes)
    check_local(q, k, v, sp=sp, causal=causal, balanced=balanced, mode=mode, enable_gqa=enable_gqa)
    s = default_scale(q.shape[-1], scale)
    if mode == "all_to_all":
        return all_to_all_attention(q, k, v, mesh, axes, causal=causal, balanced=balanced, scale=s,
                                    enable_gqa=enable_gqa)
    impl = select_impl(q, block_impl)
    return RingAttention.apply(q, k, v, mesh, axes, causal, balanced, s, impl)


def sp_attention_bsh(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int, mesh: Mesh | None = None,
                     axis="sp", *, causal: bool = True, **kw) -> torch.Tensor:
    """:func:`sp_attention` for transformer activations ``[B, S/sp, H*D]`` (sequence-sharded, heads packed).

    ``q, k, v [B, S_loc, H_loc*head_dim]`` -> ``[B, S_loc, H_loc*head_dim]``. With heads also split
    over a tensor-parallel axis, pass the local blocks: ``H_loc`` is the local head count.
    """
    b, s_loc, hd = q.shape
    if hd % head_dim:
        raise ValueError(f"hidden size {hd} (dim 2) is not a multiple of head_dim={head_dim}")

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], t.shape[1], -1, head_dim).transpose(1, 2)

    o = sp_attention(heads(q), heads(k), heads(v), mesh, axis, causal=causal, **kw)
    return o.transpose(1, 2).reshape(b, s_loc, hd)
