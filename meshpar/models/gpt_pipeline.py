"""The functional GPT as a sequence of pipeline blocks, sharing the parameters of a :class:`~.gpt.GPT`.

::

    blocks = gpt.pipeline_blocks()      # [embed, layer 0, ..., layer L-1, head], an nn.Sequential
    blocks(idx) == gpt(idx)             # same functions (gpt.embed / gpt.layer / gpt.head), same parameters

Each block is a :class:`GPTBlock` holding *the same* ``nn.Parameter`` objects as the GPT, under
the GPT names (``"wte"``, ``"h.0.attn.q.weight"``, ...), and calling one piece of the model:

=========  ===============================  ========================================  ======================
block      parameters                       input -> output                           activation spec
=========  ===============================  ========================================  ======================
embed      ``wte``, ``wpe``                 ``idx [B, T]`` -> ``x [B, T, C]``           ``plan.act['resid']``
layer l    ``h.{l}.*``                      ``x [B, T, C]`` -> ``x [B, T, C]``          ``plan.act['resid']``
head       ``ln_f.*``, ``lm_head.weight``   ``x [B, T, C]`` -> ``logits [B, T, V]``     ``plan.act['logits']``
=========  ===============================  ========================================  ======================

(``C``, ``V`` padded by the plan.) A :class:`~meshpar.pipeline.Pipeline` over these blocks runs the
model in stages; tensor-parallel plans run inside each stage (the plan's mesh then carries a
``"pipe"`` axis, which no spec names). The inputs of the embed block are plain token ids, global
over the plan's batch axes, as for :func:`~.gpt.forward`.

Dropout is not supported in blocks (``GPTConfig.dropout`` must be 0): the layout-independent masks
are keyed by global element positions, and a block only sees its micro-batch, so every
micro-batch would draw the same masks.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from .gpt import GPTConfig, embed, head, layer, param_shapes, register_dotted

if TYPE_CHECKING:
    from .gpt import GPT

KINDS = ("embed", "layer", "head")


def block_param_names(cfg: GPTConfig, kind: str, index: int = 0) -> list[str]:
    """The GPT parameter names a block reads, in :func:`~.gpt.param_shapes` order.

    Args:
        kind: ``"embed"``, ``"layer"`` (``index`` = the layer) or ``"head"``.
    """
    if kind not in KINDS:
        raise ValueError(f"GPT block kind must be one of {KINDS}, got {kind!r}")
    names = list(param_shapes(cfg))
    if kind == "embed":
        return [n for n in names if n in ("wte", "wpe")]
    if kind == "head":
        return [n for n in names if n.startswith("ln_f.") or n == "lm_head.weight"]
    if not 0 <= index < cfg.n_layer:
        raise ValueError(f"layer index {index} outside [0, {cfg.n_layer})")
    return [n for n in names if n.startswith(f"h.{index}.")]


class GPTBlock(nn.Module):
    """One pipeline block of a GPT (see the module table); its parameters are the GPT's own objects.

    Args:
        gpt: the model whose parameters (and config and plan) the block uses.
        kind: ``"embed"``, ``"layer"`` or ``"head"``.
        index: the layer, for ``kind="layer"``.
    """

    def __init__(self, gpt: "GPT", kind: str, index: int = 0):
        super().__init__()
        self.cfg, self.plan, self.kind, self.index = gpt.cfg, gpt.plan, kind, index
        params = dict(gpt.named_parameters())
        for name in block_param_names(gpt.cfg, kind, index):
            register_dotted(self, name, params[name])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``idx [B, T]`` (embed) or the residual stream ``[B, T, C]`` -> the next activation (module table)."""
        params = dict(self.named_parameters())
        if self.kind == "embed":
            return embed(params, x, self.cfg, self.plan)
        if self.kind == "layer":
            return layer(params, x, self.index, self.cfg, self.plan)
        return head(params, x, self.cfg, self.plan)

    def extra_repr(self) -> str:
        return f"{self.kind}" + (f" {self.index}" if self.kind == "layer" else "")


def pipeline_blocks(gpt: "GPT") -> nn.Sequential:
    """``[embed, layer 0, ..., layer L-1, head]`` as :class:`GPTBlock` s sharing ``gpt``'s parameters.

    Raises:
        ValueError: when ``gpt.cfg.dropout > 0`` (see the module docstring).
    """
    if gpt.cfg.dropout > 0.0:
        raise ValueError(f"the GPT pipeline blocks have no dropout (GPTConfig.dropout={gpt.cfg.dropout}): masks "
                         "would repeat across micro-batches; set model.dropout=0 with parallel.pipeline > 1")
    blocks = [GPTBlock(gpt, "embed")] + [GPTBlock(gpt, "layer", l) for l in range(gpt.cfg.n_layer)]
    return nn.Sequential(*blocks, GPTBlock(gpt, "head"))
