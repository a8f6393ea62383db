"""Functional building blocks of a transformer that run on plain tensors and on ShardedTensors.

Every function here computes the same math for a dense tensor and for any layout the operands'
specs describe; the distributed algorithm is chosen by the specs (matmuls by the dispatcher,
norms/embedding/cross-entropy/dropout by :mod:`meshpar.ops`).
"""
from __future__ import annotations

import math

import torch

from ..errors import ShardingError
from ..ops.cross_entropy import cross_entropy
from ..ops.dropout import dropout, keep_mask
from ..ops.embedding import embedding
from ..ops.norms import layer_norm, rms_norm
from ..sharding.api import reshard
from ..sharding.core import enter, wrap
from ..sharding.layout import block_offsets, local_shape
from ..sharding.spec import P
from ..sharding.tensor import ShardedTensor

__all__ = ["linear", "constrain", "take_rows", "add_positional", "causal_attention", "attention_local", "layer_norm", "rms_norm",
           "embedding", "cross_entropy", "dropout"]


def constrain(x: torch.Tensor, spec: P | None) -> torch.Tensor:
    """Bring ``x`` to layout ``spec`` (JAX's ``with_sharding_constraint``): a no-op when it is already there,
    a reduction when ``x`` is unreduced, a reshard otherwise. Plain tensors and ``spec=None`` pass through."""
    if spec is None or not isinstance(x, ShardedTensor) or x.spec == spec:
        return x
    return reshard(x, spec)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out_spec: P | None = None) -> torch.Tensor:
    """``x @ weight + bias`` with weights stored ``[in, out]``.

    Args:
        x: ``[..., in]``.
        weight: ``[in, out]``; with ShardedTensors the operands' specs pick the algorithm
            (1D column/row, SUMMA 2D, 2.5D, 3D).
        bias: ``[out]``, spec = the output's last-dim split (or None).
        out_spec: the layout the result is brought to before the bias is added (reduces a
            row-parallel partial sum); None keeps the algorithm's output layout.
    Returns:
        ``[..., out]``.
    """
    if bias is not None and not any(isinstance(t, ShardedTensor) for t in (x, weight, bias)):
        # plain tensors: one fused GEMM + bias (addmm) instead of a matmul and a separate add
        return torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[-1])
    y = constrain(x @ weight, out_spec)
    return y if bias is None else y + bias


def take_rows(w: torch.Tensor, n: int) -> torch.Tensor:
    """``w[:n]`` for a ``[N, ...]`` tensor whose first dim is not sharded (e.g. positional embeddings)."""
    if not isinstance(w, ShardedTensor):
        return w[:n]
    if w.spec.axes_of(0):
        raise ShardingError(f"take_rows: dim 0 of {w.spec} is sharded over {w.spec.axes_of(0)}; keep dim 0 replicated")
    if n > w.shape[0]:
        raise ShardingError(f"take_rows: asked for {n} rows of a tensor with {w.shape[0]}")
    return wrap(enter(w)[:n], w.spec, w.mesh, (n, *w.shape[1:]))


def add_positional(x: torch.Tensor, wpe: torch.Tensor) -> torch.Tensor:
    """``x + wpe[:T]`` for ``x [B, T, H]`` and positional embeddings ``wpe [T_max, H]``.

    Sharded: ``wpe``'s spec must be ``P(None, Ha)`` with ``Ha`` = ``x``'s hidden split; ``x``'s
    sequence dim must be whole. ``wpe``'s gradient is summed over the batch axes (or left
    unreduced over the axes in its ``_meshpar_defer_reduce``). No communication in forward.
    """
    T = x.shape[1]
    if not isinstance(x, ShardedTensor):
        return x + wpe[:T]
    if not isinstance(wpe, ShardedTensor) or wpe.spec.axes_of(0) or wpe.spec.axes_of(1) != x.spec.axes_of(2):
        got = wpe.spec if isinstance(wpe, ShardedTensor) else "a plain tensor"
        raise ShardingError(f"add_positional: wpe has {got}; for x {x.spec} it must be a ShardedTensor with spec "
                            f"{P(None, x.spec[2] if len(x.spec) > 2 else None)}")
    if x.spec.axes_of(1) or x.spec.unreduced:
        raise ShardingError(f"add_positional: x {x.spec} must have a whole, reduced sequence dim")
    if T > wpe.shape[0]:
        raise ShardingError(f"add_positional: sequence length {T} exceeds the {wpe.shape[0]} positions of wpe")
    vary = tuple(a for a in x.spec.sharded_axes() if a not in wpe.spec.sharded_axes())
    return wrap(enter(x) + enter(wpe, vary)[:T], x.spec, x.mesh, x._gshape)


def attention_local(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int, *, dropout_p: float = 0.0,
                    seed: int = 0, site: int = 0, offsets: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Causal multi-head attention on blocks ``q, k, v [b, T, h*head_dim]`` holding whole heads.

    Without dropout this is ``scaled_dot_product_attention`` (a fused kernel); with dropout the
    scores are materialized so that the keep-mask can be drawn layout-independently.

    ``offsets = (batch offset, head offset)`` of the block, so attention dropout masks match the dense op.
    """
    b, T, c = q.shape
    h = c // head_dim

    def heads(t):
        return t.reshape(b, T, h, head_dim).transpose(1, 2)

    qh, kh, vh = heads(q), heads(k), heads(v)
    if dropout_p == 0.0:  # fused kernel (FlashAttention on GPU); never materializes the [T, T] scores
        y = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True,
                                                             scale=1.0 / math.sqrt(head_dim))
        return y.transpose(1, 2).reshape(b, T, c)
    att = (qh @ kh.transpose(-2, -1)) * (1.0 / math.sqrt(head_dim))
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    att = att.masked_fill(~causal, float("-inf")).softmax(-1)
    if dropout_p > 0.0:
        m = keep_mask(att.shape, (offsets[0], offsets[1], 0, 0), dropout_p, seed, site, att.device)
        att = att * m.to(att.dtype) * (1.0 / (1.0 - dropout_p))
    return (att @ vh).transpose(1, 2).reshape(b, T, c)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int, *,
                     dropout_p: float = 0.0, seed: int = 0, site: int = 0, train: bool = False) -> torch.Tensor:
    """Causal self-attention with heads split by the hidden layout.

    Args:
        q, k, v: ``[B, T, H]`` (``H = n_head * head_dim``), plain or ShardedTensors of one spec
            ``P(Ba, None, Ha)``: the batch may be split anywhere, the hidden dim over ``Ha`` at
            head boundaries; the sequence must be whole (ring attention handles a split sequence).
        head_dim: size of one head.
        dropout_p, seed, site, train: attention-probability dropout (layout-independent masks).
    Returns:
        ``[B, T, H]`` with ``q``'s spec. No communication.
    """
    p = dropout_p if train else 0.0
    if not isinstance(q, ShardedTensor):
        return attention_local(q, k, v, head_dim, dropout_p=p, seed=seed, site=site)
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, ShardedTensor) or t.spec != q.spec or tuple(t.shape) != tuple(q.shape):
            got = t.spec if isinstance(t, ShardedTensor) else "a plain tensor"
            raise ShardingError(f"attention: {name} has {got}, shape {tuple(t.shape)}; it must match q's "
                                f"{q.spec}, shape {tuple(q.shape)}")
    if q.ndim != 3 or q.spec.unreduced:
        raise ShardingError(f"attention: q must be [B, T, H] and reduced, got shape {tuple(q.shape)}, spec {q.spec}")
    if q.spec.axes_of(1):
        raise ShardingError(f"attention: the sequence dim is split over {q.spec.axes_of(1)} in {q.spec}; this "
                            "attention needs whole sequences (use ring attention for a split sequence)")
    hl = local_shape(q._gshape, q.spec, q.mesh)[2]
    if hl % head_dim:
        raise ShardingError(f"attention: the hidden dim ({q.shape[2]}) split over {q.spec.axes_of(2)} gives blocks of "
                            f"{hl}, not whole heads of {head_dim}; make n_head divisible by "
                            f"{q.mesh.size(q.spec.axes_of(2))}")
    off = block_offsets(q._gshape, q.spec, q.mesh)
    y = attention_local(enter(q), enter(k), enter(v), head_dim, dropout_p=p, seed=seed, site=site,
                        offsets=(off[0], off[2] // head_dim))
    return wrap(y, q.spec, q.mesh, q._gshape)
