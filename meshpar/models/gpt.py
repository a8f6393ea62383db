"""meshpar's GPT: a plain nanoGPT-like ``nn.Module`` that knows nothing of parallelism.

It imports only torch (and, lazily, the chunked loss head of :mod:`meshpar.ops.fused_loss`). Tensor and
sequence parallelism are applied from outside::

    model = GPT(cfg)
    mp.parallelize(model, mesh, parallel_plan("gpt", "2d", data=("data",)))

(the plan tables live in :mod:`meshpar.models.plans`; see docs/parallelize.md). Parameter names::

    wte.weight [V, C]   wpe.weight [block_size, C]
    h.{l}.ln_1.{weight,bias} [C]    h.{l}.attn.{q,k,v,proj}.weight [C, C]  .bias [C]
    h.{l}.ln_2.{weight,bias} [C]    h.{l}.mlp.fc.weight [4C, C] .bias [4C]
                                    h.{l}.mlp.proj.weight [C, 4C] .bias [C]
    ln_f.{weight,bias} [C]          lm_head.weight [V, C]     (no ``*.bias`` when bias=False)

Linear weights are ``nn.Linear``'s ``[out, in]``. The LM head is not tied to ``wte`` (the two want
different layouts in 2D, see docs/tensor-parallel.md). Nothing is padded: logits are
``[B, T, vocab_size]`` in every layout, and a plan whose specs do not divide a size (e.g. a vocabulary
that is not a multiple of the tensor-parallel size) is refused by ``parallelize`` before any change.

Dropout is plain ``F.dropout`` (and SDPA's ``dropout_p``): on ShardedTensors meshpar draws
layout-independent masks from the mesh's shared random stream, which are not the masks torch draws
for the dense model, so sharded-vs-dense equality holds for ``dropout=0`` (or in ``eval()``);
sequence-parallel attention has no attention dropout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


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
    #: the loss of ``forward(idx, targets)`` by the chunked linear + cross-entropy of
    #: :mod:`meshpar.ops.fused_loss` (never holds the ``[B*T, V]`` logits) where it applies: plain tensors,
    #: or a head whose feature dim is whole and whose weight is split over the vocabulary at most (dense,
    #: data-parallel, 1d and sequence-parallel plans) and nothing hooks ``lm_head``'s forward (an offload
    #: unit, a user hook: the fused head reads the weight without calling the module); else the logits
    fused_loss: bool = True

    def __post_init__(self):
        for k in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, k) < 1:
                raise ValueError(f"GPTConfig.{k} must be >= 1, got {getattr(self, k)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} must be a multiple of n_head {self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: ``x [B, T, C] -> [B, T, C]`` (separate q, k, v projections)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        C = cfg.n_embd
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.q, self.k, self.v = (nn.Linear(C, C, bias=cfg.bias) for _ in range(3))
        self.proj = nn.Linear(C, C, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        hd = C // self.n_head
        # heads as -1: the same code runs on torch TP's local shards (C / tp columns, n_head / tp heads)
        q, k, v = (lin(x).view(B, T, -1, hd).transpose(1, 2) for lin in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return F.dropout(self.proj(y), self.dropout, self.training)


class MLP(nn.Module):
    """``x [B, T, C] -> gelu(fc) [B, T, 4C] -> proj [B, T, C]``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.proj(F.gelu(self.fc(x))), self.dropout, self.training)


class Block(nn.Module):
    """Pre-norm transformer block on the residual stream ``[B, T, C]``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Embed(nn.Module):
    """Token plus position embedding (and dropout): ``idx [B, T] -> x [B, T, C]``."""

    def __init__(self, cfg: GPTConfig, wte: nn.Embedding, wpe: nn.Embedding):
        super().__init__()
        self.cfg, self.wte, self.wpe = cfg, wte, wpe

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        if T > self.cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.cfg.block_size}")
        pos = torch.arange(T, device=idx.device)
        return F.dropout(self.wte(idx) + self.wpe(pos), self.cfg.dropout, self.training)


def _hooked(module: nn.Module) -> bool:
    """Whether anything hooks ``module``'s forward (its own or global hooks). The chunked loss head reads
    ``lm_head.weight`` without calling ``lm_head``, so it would skip such hooks (an offload unit's fetch of the
    weight's chunk, a user's hook): a hooked head computes its logits through the module instead. A plan's
    output-layout hook (marked ``_meshpar_output_layout``) only lays out the logits and does not count."""
    from torch.nn.modules import module as _m
    own = [h for h in module._forward_hooks.values() if not getattr(h, "_meshpar_output_layout", False)]
    return bool(own or module._forward_pre_hooks or _m._global_forward_hooks or _m._global_forward_pre_hooks)


class Head(nn.Module):
    """Final norm and LM head: ``x [B, T, C] -> logits [B, T, V]``."""

    def __init__(self, ln_f: nn.LayerNorm, lm_head: nn.Linear):
        super().__init__()
        self.ln_f, self.lm_head = ln_f, lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(x))


class GPT(nn.Module):
    """A GPT language model (see the module docstring for the parameter names).

    Args:
        cfg: the hyper-parameters.
        seed: initial weights are drawn from a generator seeded with ``seed`` (the same on every
            rank, independent of torch's global RNG): GPT-2 init, N(0, 0.02), residual projections
            scaled by 1/sqrt(2 n_layer), zero biases, unit norm weights.
        dtype: the parameter dtype.
    """

    def __init__(self, cfg: GPTConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.reset_parameters(seed)
        self.to(dtype)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Deterministic GPT-2 initialisation (see the class docstring); meta parameters are skipped."""
        g = torch.Generator().manual_seed(seed)
        std_out = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for name, p in self.named_parameters():
            if p.is_meta:  # built on the meta device (e.g. a pipeline stage's other blocks): shapes only
                continue
            if ".ln_" in name or name.startswith("ln_"):
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                std = std_out if name.endswith("proj.weight") else 0.02
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * std)

    def embed(self) -> Embed:
        """The embedding as a module (shares ``wte``/``wpe``)."""
        return Embed(self.cfg, self.wte, self.wpe)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, T, V]`` of ``idx [B, T]``, or the mean cross-entropy over ``targets != -1``."""
        T = idx.shape[1]
        if T > self.cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.cfg.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = F.dropout(self.wte(idx) + self.wpe(pos), self.cfg.dropout, self.training)
        for block in self.h:
            x = block(x)
        x = self.ln_f(x)
        if targets is None:
            return self.lm_head(x)
        if self.cfg.fused_loss and self.lm_head.bias is None and not _hooked(self.lm_head):
            from ..ops.fused_loss import try_fused_linear_cross_entropy
            loss = try_fused_linear_cross_entropy(x, self.lm_head.weight, targets, ignore_index=-1)
            if loss is not None:
                return loss
        logits = self.lm_head(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)

    def pipeline_blocks(self) -> nn.Sequential:
        """This model as pipeline blocks sharing its modules: ``[embed, h.0, ..., h.{L-1}, head]``
        (``idx [B, T] -> x [B, T, C] -> ... -> logits [B, T, V]``); ``blocks(idx)`` equals ``self(idx)``."""
        return nn.Sequential(self.embed(), *self.h, Head(self.ln_f, self.lm_head))

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, seed: int = 0, multiple: int = 1,
                 gather=None) -> torch.Tensor:
        """Sample ``max_new_tokens`` continuations of ``idx [B, T]`` (plain, the same on every rank).

        Sampling uses a generator seeded with ``seed``; ``temperature=0`` picks the argmax. ``multiple``:
        the context is right-padded to a multiple of it (a split sequence must divide; causal rows before
        the padding are unchanged). ``gather``: applied to the logits to make them plain (e.g.
        ``meshpar.unshard`` for a parallelized model).
        """
        g = torch.Generator().manual_seed(seed)
        for _ in range(max_new_tokens):
            ctx = idx[:, -self.cfg.block_size:]
            if -(-ctx.shape[1] // multiple) * multiple > self.cfg.block_size:
                ctx = ctx[:, -(self.cfg.block_size // multiple * multiple):]
            T = ctx.shape[1]
            pad = -T % multiple
            if pad:
                ctx = torch.cat([ctx, ctx.new_zeros(ctx.shape[0], pad)], dim=1)
            logits = self(ctx)
            if gather is not None:
                logits = gather(logits)
            last = logits[:, T - 1, :].double()
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
