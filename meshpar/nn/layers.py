"""``nn.Module`` layers whose parameters are ShardedTensors laid out by the specs you pass.

The layout comes from specs, not class names: one ``Linear`` is column-parallel with
``weight_spec=P(None, "tp")``, row-parallel with ``P("tp", None)``, SUMMA 2D with ``P("x", "y")``
and 3D with ``P("k", ("j", "i"))``. With ``mesh=None`` every layer is the plain dense layer.

Sizes that do not divide the shard count are zero-padded by the layer (``.padded_*``
attributes). Padding is exact: padded weights stay zero and get zero gradients, and norms count
only the real positions.

**Logical sizes in and out.** A layer whose feature dim is padded takes its input at the logical
size (``[..., in_features]``; it zero-pads it itself) or already padded (``[..., padded_in]``), and
returns its output at the **logical** size (``[..., out_features]``): the padded columns are
dropped (the output's last dim is gathered first when it is split, one all-gather of the output,
and only when padding exists). So a 9-class head on a 2 x 2 grid returns ``[B, 9]`` logits, and any
loss (``nn.CrossEntropyLoss()``, ``meshpar.nn.CrossEntropyLoss()`` with or without ``vocab_size=``),
softmax, argmax or sampling sees only the real classes. ``keep_padding=True`` returns the padded
output instead (``[..., padded_out]``, zeros in the pad: then pass ``vocab_size=`` to the loss).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import ShardingError
from ..mesh import Mesh, current_mesh
from ..sharding.api import reshard, shard
from ..sharding.core import enter, wrap
from ..sharding.spec import P
from ..sharding.tensor import ShardedTensor
from . import functional as Fm


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _mult(mesh: Mesh | None, spec: P | None, dim: int) -> int:
    if mesh is None or spec is None or not spec.axes_of(dim):
        return 1
    return mesh.size(spec.axes_of(dim))


def _param(t: torch.Tensor, spec: P | None, mesh: Mesh | None, padded: tuple[int, ...]) -> nn.Parameter:
    if tuple(t.shape) != padded:
        z = t.new_zeros(padded)
        z[tuple(slice(0, n) for n in t.shape)] = t
        t = z
    if mesh is None:
        return nn.Parameter(t.clone())
    return nn.Parameter(shard(t, spec if spec is not None else P(), mesh))


def pad_last(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x [..., m]`` zero-padded to ``[..., n]`` (``n >= m``). A ShardedTensor whose last dim is split
    is first gathered on that dim (the pad must sit at the global end); other dims keep their layout."""
    m = x.shape[-1]
    if m == n:
        return x
    if not isinstance(x, ShardedTensor):
        return torch.nn.functional.pad(x, (0, n - m))
    x = _whole_last(x)
    return wrap(torch.nn.functional.pad(enter(x), (0, n - m)), x.spec, x.mesh, (*x.shape[:-1], n))


def unpad_last(x: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` entries of ``x``'s last dim (``x[..., :n]``) at the logical size. A ShardedTensor
    is first reduced (if unreduced) and gathered on its last dim; other dims keep their layout."""
    if x.shape[-1] == n:
        return x
    if not isinstance(x, ShardedTensor):
        return x[..., :n]
    x = _whole_last(x)
    return wrap(enter(x)[..., :n], x.spec, x.mesh, (*x.shape[:-1], n))


def _whole_last(x: ShardedTensor) -> ShardedTensor:
    """``x`` reduced, with its last dim replicated (other dims' layout kept)."""
    entries = [x.spec[d] if d < len(x.spec) else None for d in range(x.ndim)]
    entries[-1] = None
    want = P(*entries)
    return x if x.spec == want else reshard(x, want)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Linear(nn.Module):
    """``y = x @ weight + bias`` with ``weight [in, out]``.

    Args:
        in_features, out_features: real sizes (padded to the shard counts of ``weight_spec``).
        weight_spec: spec of ``weight``; picks the algorithm.
        bias_spec: spec of ``bias``; default ``P(weight_spec[1])``. In 3D the output's hidden
            dim is split over fewer axes than the weight's (e.g. ``P("j")`` for ``P("k", ("j","i"))``).
        out_spec: layout the product is brought to before the bias (reduces a row-parallel partial sum).
        weight, bias: optional dense initial values (else U(-1/sqrt(in), 1/sqrt(in)) from ``seed``).
        keep_padding: return ``[..., padded_out]`` (zeros in the pad) instead of the logical
            ``[..., out_features]`` (see the module docstring).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, mesh: Mesh | None = None,
                 weight_spec: P | None = None, bias_spec: P | None = None, out_spec: P | None = None,
                 weight: torch.Tensor | None = None, bias_init: torch.Tensor | None = None, seed: int = 0,
                 dtype: torch.dtype = torch.float32, keep_padding: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.mesh, self.out_spec = in_features, out_features, mesh, out_spec
        self.keep_padding = keep_padding
        weight_spec = weight_spec if weight_spec is not None else P()
        if bias_spec is None:
            bias_spec = P(weight_spec[1] if len(weight_spec) > 1 else None)
        self.padded_in = _round_up(in_features, _mult(mesh, weight_spec, 0))
        self.padded_out = _round_up(_round_up(out_features, _mult(mesh, weight_spec, 1)), _mult(mesh, bias_spec, 0))
        bound = 1.0 / math.sqrt(in_features)
        g = _gen(seed)
        if weight is None:
            weight = (torch.rand(in_features, out_features, generator=g, dtype=torch.float64) * 2 - 1) * bound
        self.weight = _param(weight.to(dtype), weight_spec, mesh, (self.padded_in, self.padded_out))
        if bias:
            if bias_init is None:
                bias_init = (torch.rand(out_features, generator=g, dtype=torch.float64) * 2 - 1) * bound
            self.bias = _param(bias_init.to(dtype), bias_spec, mesh, (self.padded_out,))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in_features]`` or ``[..., padded_in]`` -> ``[..., out_features]`` (``[..., padded_out]``
        with ``keep_padding=True``)."""
        if x.shape[-1] not in (self.in_features, self.padded_in):
            raise ShardingError(f"Linear: input has {x.shape[-1]} features (last dim); expected in_features="
                                f"{self.in_features} (or the padded {self.padded_in})")
        y = Fm.linear(pad_last(x, self.padded_in), self.weight, self.bias, self.out_spec)
        return y if self.keep_padding else unpad_last(y, self.out_features)


class Linear2D(Linear):
    """SUMMA 2D linear layer on a q x q grid (mesh axes ``"x"``, ``"y"``), like Colossal-AI's ``Linear2D``.

    ``weight [in, out]`` is ``P("x", "y")``, ``bias [out]`` is ``P("y")``. The layer places its own
    input: ``x [B, ..., in]`` is brought to ``P(Ba, None, ..., "y")`` with ``Ba = ("data", "x")`` when
    the mesh has a ``"data"`` axis, else ``"x"``. A ShardedTensor input (e.g. the engine's
    ``from_local(batch, P("data"))``, or the previous ``Linear2D``'s output) is resharded (a free
    local slice from ``P("data")``); a plain tensor is taken as the **global** input, equal on
    every rank. The output ``[B, ..., out]`` is ``P(Ba, None, ..., "y")``, which the next
    ``Linear2D`` takes as is.

    Args:
        in_features, out_features: sizes (padded to a multiple of q inside; input and output are at
            the logical sizes, see the module docstring).
        mesh: default: the current mesh (``with mesh:``, or the one ``meshpar.train.launch`` set).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, mesh: Mesh | None = None,
                 weight: torch.Tensor | None = None, bias_init: torch.Tensor | None = None, seed: int = 0,
                 dtype: torch.dtype = torch.float32, keep_padding: bool = False):
        mesh = current_mesh(mesh)
        for a in ("x", "y"):
            if a not in mesh.names:
                raise ShardingError(f"Linear2D needs mesh axes 'x' and 'y' (a q x q grid); {mesh} has {mesh.names}. "
                                    "Use the config parallel=dict(tensor=dict(size=q*q, mode='2d'))")
        super().__init__(in_features, out_features, bias, mesh=mesh, weight_spec=P("x", "y"), bias_spec=P("y"),
                         weight=weight, bias_init=bias_init, seed=seed, dtype=dtype, keep_padding=keep_padding)
        self.batch_axes = ("data", "x") if "data" in mesh.names else ("x",)

    def input_spec(self, ndim: int) -> P:
        """The layout the layer brings its ``ndim``-dim input to: ``P(Ba, None, ..., "y")``."""
        return P(self.batch_axes, *([None] * (ndim - 2)), "y")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, ..., in]`` (ShardedTensor, or a plain global tensor) -> ``[B, ..., out]`` ``P(Ba, ..., "y")``."""
        if x.ndim < 2:
            raise ShardingError(f"Linear2D takes [batch, ..., {self.in_features}], got shape {tuple(x.shape)}")
        if x.shape[-1] not in (self.in_features, self.padded_in):
            raise ShardingError(f"Linear2D: input has {x.shape[-1]} features (last dim); expected in_features="
                                f"{self.in_features}")
        x = pad_last(x, self.padded_in)
        spec = self.input_spec(x.ndim)
        x = reshard(x, spec) if isinstance(x, ShardedTensor) else shard(x, spec, self.mesh)
        return super().forward(x)


class LayerNorm(nn.Module):
    """LayerNorm over the last dim, which may be sharded by ``spec`` (the weight's spec, e.g. ``P("y")``)."""

    def __init__(self, normalized_shape: int, eps: float = 1e-5, bias: bool = True, *, mesh: Mesh | None = None,
                 spec: P | None = None, weight: torch.Tensor | None = None, bias_init: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.normalized_shape, self.eps = normalized_shape, eps
        self.padded = _round_up(normalized_shape, _mult(mesh, spec, 0))
        w = weight if weight is not None else torch.ones(normalized_shape)
        self.weight = _param(w.to(dtype), spec, mesh, (self.padded,))
        if bias:
            b = bias_init if bias_init is not None else torch.zeros(normalized_shape)
            self.bias = _param(b.to(dtype), spec, mesh, (self.padded,))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., n]`` at the logical size (padded in, unpadded out) or padded (kept padded)."""
        logical = x.shape[-1] == self.normalized_shape != self.padded
        y = Fm.layer_norm(pad_last(x, self.padded), self.weight, self.bias, self.eps, true_size=self.normalized_shape)
        return unpad_last(y, self.normalized_shape) if logical else y


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, which may be sharded by ``spec``."""

    def __init__(self, normalized_shape: int, eps: float = 1e-6, *, mesh: Mesh | None = None, spec: P | None = None,
                 weight: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.normalized_shape, self.eps = normalized_shape, eps
        self.padded = _round_up(normalized_shape, _mult(mesh, spec, 0))
        w = weight if weight is not None else torch.ones(normalized_shape)
        self.weight = _param(w.to(dtype), spec, mesh, (self.padded,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., n]`` at the logical size (padded in, unpadded out) or padded (kept padded)."""
        logical = x.shape[-1] == self.normalized_shape != self.padded
        y = Fm.rms_norm(pad_last(x, self.padded), self.weight, self.eps, true_size=self.normalized_shape)
        return unpad_last(y, self.normalized_shape) if logical else y


class Embedding(nn.Module):
    """Vocab-parallel embedding: ``weight [V, H]`` with ``spec`` e.g. ``P("tp", None)`` or ``P("x", "y")``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, mesh: Mesh | None = None, spec: P | None = None,
                 weight: torch.Tensor | None = None, seed: int = 0, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padded_num = _round_up(num_embeddings, _mult(mesh, spec, 0))
        self.padded_dim = _round_up(embedding_dim, _mult(mesh, spec, 1))
        if weight is None:
            weight = torch.randn(num_embeddings, embedding_dim, generator=_gen(seed), dtype=torch.float64)
        self.weight = _param(weight.to(dtype), spec, mesh, (self.padded_num, self.padded_dim))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """``idx [...]`` (plain or ShardedTensor ids) -> ``[..., padded_dim]``."""
        return Fm.embedding(idx, self.weight)


class Dropout(nn.Module):
    """Dropout with layout-independent masks drawn from ``(seed, site, global index)``.

    Pass a fresh ``seed`` per step (e.g. the step number); with the same seed every layout
    drops the same elements as the dense tensor would.
    """

    def __init__(self, p: float = 0.5, *, site: int = 0):
        super().__init__()
        self.p, self.site = p, site

    def forward(self, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
        return Fm.dropout(x, self.p, seed=seed, site=self.site, train=self.training)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; heads are split by the hidden layout of q/k/v.

    Args:
        n_embd, n_head: model sizes (``n_embd`` divisible by ``n_head``; the head count must
            divide by the shard count of the inner hidden dim).
        in_spec, in_bias_spec: specs of the q/k/v weights/biases (resid -> inner layout).
        out_spec_w, out_bias_spec: specs of the output projection (inner -> resid layout).
        inner, resid: activation layouts after the q/k/v and output projections.
    """

    def __init__(self, n_embd: int, n_head: int, bias: bool = True, dropout: float = 0.0, *,
                 mesh: Mesh | None = None, in_spec: P | None = None, in_bias_spec: P | None = None,
                 out_spec_w: P | None = None, out_bias_spec: P | None = None, inner: P | None = None,
                 resid: P | None = None, seed: int = 0, dtype: torch.dtype = torch.float32):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd {n_embd} must be a multiple of n_head {n_head}")
        self.head_dim, self.dropout = n_embd // n_head, dropout
        kw = dict(mesh=mesh, dtype=dtype)
        self.q, self.k, self.v = (Linear(n_embd, n_embd, bias, weight_spec=in_spec, bias_spec=in_bias_spec,
                                         out_spec=inner, seed=seed + i, **kw) for i in range(3))
        self.proj = Linear(n_embd, n_embd, bias, weight_spec=out_spec_w, bias_spec=out_bias_spec, out_spec=resid,
                           seed=seed + 3, **kw)

    def forward(self, x: torch.Tensor, seed: int = 0, site: int = 0) -> torch.Tensor:
        y = Fm.causal_attention(self.q(x), self.k(x), self.v(x), self.head_dim, dropout_p=self.dropout, seed=seed,
                                site=site, train=self.training)
        return self.proj(y)


class CrossEntropyLoss(nn.Module):
    """Vocab-parallel cross-entropy with the class dim last; masks padded vocabulary columns."""

    def __init__(self, vocab_size: int | None = None, ignore_index: int = -100, reduction: str = "mean"):
        super().__init__()
        self.vocab_size, self.ignore_index, self.reduction = vocab_size, ignore_index, reduction

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return Fm.cross_entropy(logits, targets, ignore_index=self.ignore_index, reduction=self.reduction,
                                vocab_size=self.vocab_size)
