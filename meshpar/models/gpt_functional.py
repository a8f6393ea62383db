"""LEGACY: the former functional GPT (a dict of parameters plus pure functions, ``plan=`` threaded
through), kept only because the plain GPT (:mod:`meshpar.models.gpt`) has no 3d plan table yet.
Nothing in meshpar uses it; new code uses ``GPT`` + ``mp.parallelize`` (docs/parallelize.md).

The same :func:`forward` runs dense and in every tensor-parallel mode; only the
:class:`~meshpar.models.plans.Plan` (a table of specs) differs. Weights are stored ``[in, out]``
(``y = x @ w + b``). Parameter names::

    wte [V, C]   wpe [block_size, C]
    h.{l}.ln_1.{weight,bias} [C]      h.{l}.attn.{q,k,v,proj}.weight [C, C]  .bias [C]
    h.{l}.ln_2.{weight,bias} [C]      h.{l}.mlp.fc.weight [C, 4C] .bias [4C]
                                      h.{l}.mlp.proj.weight [4C, C] .bias [C]
    ln_f.{weight,bias} [C]            lm_head.weight [C, V]     (no ``*.bias`` when bias=False)

The LM head is not tied to ``wte``: the two want different layouts in 2D/3D (see
docs/tensor-parallel.md). Under a plan, sizes are padded (:func:`~meshpar.models.plans.padded_sizes`)
and ``forward`` returns logits of global shape ``[B, T, V_padded]``; columns ``>= vocab_size`` are
padding (use :func:`loss_fn`, which masks them, or slice ``[..., :vocab_size]`` after ``unshard``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ShardingError
from ..nn.functional import (add_positional, causal_attention, constrain, cross_entropy, dropout, embedding,
                             layer_norm, linear)
from ..ops.attention import sp_attention_bsh
from ..sharding.api import unshard
from ..sharding.core import enter, reduce_unreduced, wrap
from ..sharding.layout import block_positions as _block_positions, local_shape
from ..sharding.spec import P
from ..sharding.tensor import ShardedTensor
from .plans import Plan, padded_sizes, shard_params


@dataclass(frozen=True)
class GPTConfig:
    """GPT hyper-parameters (nanoGPT's names)."""
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = True

    def __post_init__(self):
        for k in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, k) < 1:
                raise ValueError(f"GPTConfig.{k} must be >= 1, got {getattr(self, k)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} must be a multiple of n_head {self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def param_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Name -> dense shape of every parameter, in a fixed order."""
    C, V = cfg.n_embd, cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"wte": (V, C), "wpe": (cfg.block_size, C)}

    def norm(prefix):
        shapes[prefix + ".weight"] = (C,)
        if cfg.bias:
            shapes[prefix + ".bias"] = (C,)

    def lin(prefix, i, o):
        shapes[prefix + ".weight"] = (i, o)
        if cfg.bias:
            shapes[prefix + ".bias"] = (o,)

    for l in range(cfg.n_layer):
        p = f"h.{l}."
        norm(p + "ln_1")
        for n in ("q", "k", "v", "proj"):
            lin(p + "attn." + n, C, C)
        norm(p + "ln_2")
        lin(p + "mlp.fc", C, 4 * C)
        lin(p + "mlp.proj", 4 * C, C)
    norm("ln_f")
    shapes["lm_head.weight"] = (C, V)
    return shapes


def init_params(cfg: GPTConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Dense, deterministic parameters (GPT-2 init: N(0, 0.02), residual projections scaled by
    1/sqrt(2 n_layer), zero biases, unit norm weights). Same values on every rank for one seed."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in param_shapes(cfg).items():
        if "ln_" in name:
            t = torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
        elif name.endswith("bias"):
            t = torch.zeros(shape)
        else:
            std = 0.02 / (2 * cfg.n_layer) ** 0.5 if name.endswith("proj.weight") else 0.02
            t = torch.randn(shape, generator=g, dtype=torch.float64) * std
        out[name] = t.to(dtype)
    return out


def block_positions(x: ShardedTensor, dim: int = 1) -> torch.Tensor:
    """Global positions of the rows of ``x``'s local block along the sequence dim (``dim``).

    Contiguous layout: ``[off, off + T_loc)``; zigzag (``Zigzag("sp")``): chunk ``r`` then chunk
    ``2sp-1-r`` (see :func:`meshpar.sharding.layout.block_positions`).
    """
    return _block_positions(x._gshape, x.spec, x.mesh, dim, device=x._local.device)


def add_positional_sp(x: torch.Tensor, wpe: torch.Tensor) -> torch.Tensor:
    """``x + wpe[positions]`` for ``x [B, T, C]`` whose sequence dim (1) is split (contiguous or zigzag).

    Each rank adds the rows of ``wpe`` at the *global* positions of its block (see
    :func:`block_positions`). ``wpe [T_max, C]`` must be a ShardedTensor with spec ``P(None, Ca)``,
    ``Ca`` = ``x``'s hidden split; its gradient is summed over the axes that split ``x`` but not
    ``wpe`` (batch and sequence), or left unreduced over its ``_meshpar_defer_reduce`` axes.
    No communication in forward.
    """
    if not isinstance(x, ShardedTensor) or not isinstance(wpe, ShardedTensor):
        raise ShardingError("add_positional_sp: x and wpe must be ShardedTensors under a sequence-parallel plan")
    want = P(None, x.spec[2] if len(x.spec) > 2 else None)
    if wpe.spec.axes_of(0) or wpe.spec.axes_of(1) != x.spec.axes_of(2):
        raise ShardingError(f"add_positional_sp: wpe has {wpe.spec}; for x {x.spec} it must be {want}")
    if x.spec.unreduced:
        raise ShardingError(f"add_positional_sp: x {x.spec} must be reduced")
    if x.shape[1] > wpe.shape[0]:
        raise ShardingError(f"add_positional_sp: sequence length {x.shape[1]} exceeds the {wpe.shape[0]} "
                            "positions of wpe")
    pos = block_positions(x, 1)
    vary = tuple(a for a in x.spec.sharded_axes() if a not in wpe.spec.sharded_axes())
    return wrap(enter(x) + enter(wpe, vary).index_select(0, pos), x.spec, x.mesh, x._gshape)


def attention_sp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int, plan: Plan) -> torch.Tensor:
    """Causal attention of ``q, k, v [B, T, H]`` whose sequence dim is split over ``plan.seq_axes``.

    Ring or all-to-all attention (``plan.sequence_mode``) on the local blocks
    (:func:`~meshpar.ops.attention.sp_attention_bsh`); heads may also be split over other axes of
    the hidden dim (1d+sp: "tp"), each rank attending with its local heads. Returns ``q``'s spec.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, ShardedTensor) or t.spec.axes_of(1) != plan.seq_axes:
            got = t.spec if isinstance(t, ShardedTensor) else "a plain tensor"
            raise ShardingError(f"sequence-parallel attention: {name} has {got}; its sequence dim (1) must be "
                                f"split over {plan.seq_axes}")
    q, k, v = (reduce_unreduced(t) for t in (q, k, v))
    if k.spec != q.spec or v.spec != q.spec:
        raise ShardingError(f"sequence-parallel attention: q {q.spec}, k {k.spec}, v {v.spec} must have one spec")
    hl = local_shape(q._gshape, q.spec, q.mesh)[2]
    if hl % head_dim:
        raise ShardingError(f"attention: the hidden dim ({q.shape[2]}) split over {q.spec.axes_of(2)} gives blocks "
                            f"of {hl}, not whole heads of {head_dim}")
    y = sp_attention_bsh(enter(q), enter(k), enter(v), head_dim, q.mesh, plan.seq_axes, causal=True,
                         mode=plan.sequence_mode, balanced=q.spec.layout_of(1) == "zigzag")
    return wrap(y, q.spec, q.mesh, q._gshape)


def _plan_or_dense(plan: Plan | None) -> Plan:
    from .plans import make_plan
    return make_plan("dense") if plan is None else plan


def _dropout_p(cfg: GPTConfig, plan: Plan, train: bool) -> float:
    """The dropout probability of a forward; sequence-parallel attention has none (raises then)."""
    p = cfg.dropout if train else 0.0
    if plan.seq_axes and p > 0.0:
        raise ShardingError(f"mode {plan.mode!r} splits the sequence: sequence-parallel attention has no "
                            f"attention dropout, so train with GPTConfig.dropout=0 (got {cfg.dropout})")
    return p


def _acts(plan: Plan) -> Mapping[str, P]:
    return plan.act if not plan.dense else {}


def _bias(params: Mapping[str, torch.Tensor], cfg: GPTConfig, name: str) -> torch.Tensor | None:
    return params.get(name) if cfg.bias else None


def _ln(params: Mapping[str, torch.Tensor], x: torch.Tensor, prefix: str, cfg: GPTConfig) -> torch.Tensor:
    return layer_norm(x, params[prefix + ".weight"], _bias(params, cfg, prefix + ".bias"), 1e-5, true_size=cfg.n_embd)


def _lin(params: Mapping[str, torch.Tensor], x: torch.Tensor, prefix: str, cfg: GPTConfig, out: P | None):
    return linear(x, params[prefix + ".weight"], _bias(params, cfg, prefix + ".bias"), out)


def embed(params: Mapping[str, torch.Tensor], idx: torch.Tensor, cfg: GPTConfig, plan: Plan | None = None, *,
          train: bool = False, seed: int = 0) -> torch.Tensor:
    """Token plus position embedding (and dropout, site 0) of ``idx [B, T]``.

    Reads ``wte``, ``wpe``. ``idx`` is global on every rank (laid out here as ``plan.act['tokens']``)
    or already laid out. Returns the residual stream ``[B, T, C]`` (``[B, T, C_padded]`` with spec
    ``plan.act['resid']`` under a plan).
    Raises:
        ShardingError: ``idx`` not 2-D, ``T > block_size``, or dropout under a sequence-parallel plan.
    """
    plan = _plan_or_dense(plan)
    if idx.ndim != 2:
        raise ShardingError(f"idx must be [B, T], got shape {tuple(idx.shape)}")
    if idx.shape[1] > cfg.block_size:
        raise ShardingError(f"sequence length {idx.shape[1]} exceeds block_size {cfg.block_size}")
    p = _dropout_p(cfg, plan, train)
    idx = plan.place(idx, "tokens")
    x = constrain(embedding(idx, params["wte"]), _acts(plan).get("resid"))
    x = add_positional_sp(x, params["wpe"]) if plan.seq_axes else add_positional(x, params["wpe"])
    return dropout(x, p, seed=seed, site=0, train=train)


def layer(params: Mapping[str, torch.Tensor], x: torch.Tensor, l: int, cfg: GPTConfig, plan: Plan | None = None, *,
          train: bool = False, seed: int = 0) -> torch.Tensor:
    """Transformer block ``l`` (pre-norm attention and MLP, dropout sites ``4l+1..4l+3``) on the
    residual stream ``x [B, T, C]`` (spec ``plan.act['resid']``); same shape and spec out.

    Reads ``h.{l}.*``.
    """
    plan = _plan_or_dense(plan)
    p = _dropout_p(cfg, plan, train)
    act = _acts(plan)
    resid, inner = act.get("resid"), act.get("inner")
    pre = f"h.{l}."

    def drop(t, site):
        return dropout(t, p, seed=seed, site=site, train=train)

    h = _ln(params, x, pre + "ln_1", cfg)
    q, k, v = (_lin(params, h, pre + f"attn.{n}", cfg, inner) for n in ("q", "k", "v"))
    head_dim = padded_sizes(cfg, plan).head_dim
    if plan.seq_axes:
        y = attention_sp(q, k, v, head_dim, plan)
    else:
        y = causal_attention(q, k, v, head_dim, dropout_p=p, seed=seed, site=4 * l + 1, train=train)
    x = x + drop(_lin(params, y, pre + "attn.proj", cfg, resid), 4 * l + 2)
    h = F.gelu(_lin(params, _ln(params, x, pre + "ln_2", cfg), pre + "mlp.fc", cfg, inner))
    return x + drop(_lin(params, h, pre + "mlp.proj", cfg, resid), 4 * l + 3)


def head(params: Mapping[str, torch.Tensor], x: torch.Tensor, cfg: GPTConfig, plan: Plan | None = None) -> torch.Tensor:
    """Final norm and LM head: residual stream ``[B, T, C]`` -> logits ``[B, T, V]`` (``[B, T, V_padded]``
    with spec ``plan.act['logits']`` under a plan). Reads ``ln_f.*``, ``lm_head.weight``."""
    plan = _plan_or_dense(plan)
    return linear(_ln(params, x, "ln_f", cfg), params["lm_head.weight"], None, _acts(plan).get("logits"))


def forward(params: Mapping[str, torch.Tensor], idx: torch.Tensor, cfg: GPTConfig, plan: Plan | None = None, *,
            train: bool = False, seed: int = 0) -> torch.Tensor:
    """Logits of ``idx [B, T]`` (int ids, global on every rank, or already laid out as ``plan.act['tokens']``):
    :func:`embed`, :func:`layer` for every layer, :func:`head`.

    Args:
        params: from :func:`init_params` (dense plan) or :func:`~meshpar.models.plans.shard_params`.
        train: enables dropout (``cfg.dropout``); masks come from ``seed`` and are layout-independent,
            so every mode drops the same elements as the dense model.
    Returns:
        ``[B, T, V]`` (plain) or ``[B, T, V_padded]`` ShardedTensor with spec ``plan.act['logits']``
        (``unshard`` gives natural order in every layout, balanced included).
    Raises:
        ShardingError: under a sequence-parallel plan, when ``T`` is not a multiple of
            ``plan.seq_multiple`` or when training with dropout (ring/all-to-all attention has none).
    """
    plan = _plan_or_dense(plan)
    x = embed(params, idx, cfg, plan, train=train, seed=seed)
    for l in range(cfg.n_layer):
        x = layer(params, x, l, cfg, plan, train=train, seed=seed)
    return head(params, x, cfg, plan)


def loss_fn(params: dict[str, torch.Tensor], idx: torch.Tensor, targets: torch.Tensor, cfg: GPTConfig,
            plan: Plan | None = None, *, train: bool = False, seed: int = 0, ignore_index: int = -1) -> torch.Tensor:
    """Mean next-token cross-entropy over targets != ``ignore_index``; a plain scalar on every rank.

    The sharded path never materialises full logits (vocab-parallel cross-entropy).
    """
    plan = _plan_or_dense(plan)
    logits = forward(params, idx, cfg, plan, train=train, seed=seed)
    if isinstance(logits, ShardedTensor):
        targets = plan.place(targets, "targets")
    loss = cross_entropy(logits, targets, ignore_index=ignore_index, vocab_size=cfg.vocab_size)
    return unshard(loss) if isinstance(loss, ShardedTensor) else loss


@torch.no_grad()
def generate(params: dict[str, torch.Tensor], idx: torch.Tensor, cfg: GPTConfig, plan: Plan | None = None,
             max_new_tokens: int = 16, *, temperature: float = 1.0, top_k: int | None = None,
             seed: int = 0) -> torch.Tensor:
    """Sample ``max_new_tokens`` continuations of ``idx [B, T]`` (global, the same on every rank).

    Sampling uses a generator seeded with ``seed``, so every rank draws the same tokens.
    ``temperature=0`` picks the argmax. Returns ``[B, T + max_new_tokens]`` (plain, on every rank).
    """
    plan = _plan_or_dense(plan)
    g = torch.Generator().manual_seed(seed)
    m = plan.seq_multiple if plan.seq_axes else 1
    for _ in range(max_new_tokens):
        ctx = idx[:, -cfg.block_size:]
        T = ctx.shape[1]
        if -(-T // m) * m > cfg.block_size:  # a split sequence must divide; keep the longest context that does
            ctx = ctx[:, -(cfg.block_size // m * m):]
            T = ctx.shape[1]
        pad = -T % m  # right padding: causal rows before it are unchanged
        if pad:
            ctx = torch.cat([ctx, ctx.new_zeros(ctx.shape[0], pad)], dim=1)
        logits = forward(params, ctx, cfg, plan)
        if isinstance(logits, ShardedTensor):
            logits = unshard(logits)
        last = logits[:, T - 1, :cfg.vocab_size].double()
        if temperature == 0.0:
            nxt = last.argmax(-1, keepdim=True)
        else:
            last = last / temperature
            if top_k is not None:
                kth = torch.topk(last, min(top_k, last.shape[-1])).values[:, -1:]
                last = last.masked_fill(last < kth, float("-inf"))
            nxt = torch.multinomial(last.softmax(-1), 1, generator=g)
        idx = torch.cat([idx, nxt.to(idx.dtype)], dim=1)
    return idx


class GPT(nn.Module):
    """The functional GPT's parameters as ``nn.Parameter``s (ShardedTensors under a plan), for
    ``torch.optim`` and the training engine. ``named_parameters()`` yields the GPT names."""

    def __init__(self, cfg: GPTConfig, plan: Plan | None = None, params: dict[str, torch.Tensor] | None = None,
                 *, seed: int = 0, dtype: torch.dtype = torch.float32, defer_reduce: tuple[str, ...] = ()):
        """Args:
            params: dense initial parameters (default :func:`init_params` with ``seed``, ``dtype``).
            defer_reduce: mesh axes (e.g. ``("data",)``) over which parameter gradients are left
                *unreduced* (``grad.spec.unreduced``) for a data-parallel/ZeRO reducer to sum in buckets.
        """
        super().__init__()
        self.cfg = cfg
        self.plan = _plan_or_dense(plan)
        dense = params if params is not None else init_params(cfg, seed, dtype)
        self._names = list(dense)
        for name, t in shard_params(dense, cfg, self.plan).items():
            param = nn.Parameter(t.detach().clone() if not isinstance(t, ShardedTensor) else t, requires_grad=True)
            if defer_reduce and isinstance(t, ShardedTensor):
                param._meshpar_defer_reduce = tuple(a for a in defer_reduce if a in t.mesh.names)
            register_dotted(self, name, param)

    def params(self) -> dict[str, torch.Tensor]:
        """Name -> parameter, the dict :func:`forward` takes."""
        return dict(self.named_parameters())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, train: bool | None = None,
                seed: int = 0):
        """Logits, or the loss when ``targets`` is given. ``train`` defaults to ``self.training``."""
        train = self.training if train is None else train
        if targets is None:
            return forward(self.params(), idx, self.cfg, self.plan, train=train, seed=seed)
        return loss_fn(self.params(), idx, targets, self.cfg, self.plan, train=train, seed=seed)

    def generate(self, idx: torch.Tensor, max_new_tokens: int, **kw) -> torch.Tensor:
        return generate(self.params(), idx, self.cfg, self.plan, max_new_tokens, **kw)


def register_dotted(module: nn.Module, name: str, param: nn.Parameter) -> None:
    """Register ``param`` under the dotted ``name`` (``"h.0.ln_1.weight"``), creating empty
    sub-modules on the way, so ``module.named_parameters()`` yields ``name``."""
    *path, leaf = name.split(".")
    mod = module
    for part in path:
        if not hasattr(mod, part):
            mod.add_module(part, nn.Module())
        mod = getattr(mod, part)
    mod.register_parameter(leaf, param)
