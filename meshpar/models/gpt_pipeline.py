"""The plain GPT as a sequence of pipeline blocks that share its modules (and so its parameters).

::

    blocks = gpt.pipeline_blocks()      # nn.Sequential(Embed, h.0, ..., h.{L-1}, Head)
    blocks(idx) == gpt(idx)

=========  ==============================  ======================================
block      modules (the GPT's own)         input -> output
=========  ==============================  ======================================
embed      ``wte``, ``wpe``                ``idx [B, T]`` -> ``x [B, T, C]``
layer l    ``h.{l}``                       ``x [B, T, C]`` -> ``x [B, T, C]``
head       ``ln_f``, ``lm_head``           ``x [B, T, C]`` -> ``logits [B, T, V]``
=========  ==============================  ======================================

The blocks hold no parameters of their own: ``parallelize`` the GPT first (its plan lays out the token
ids at ``wte``'s input, so the embed block places them as the whole model does), then split it.
:func:`meshpar.train.initialize` does this when ``parallel.pipeline > 1`` and names every parameter
as in the whole GPT (``"h.0.attn.q.weight"``), so checkpoints load in any layout.
"""
from __future__ import annotations

import torch.nn as nn

from .gpt import GPT, Embed, Head

__all__ = ["Embed", "Head", "pipeline_blocks"]


def pipeline_blocks(gpt: GPT) -> nn.Sequential:
    """``[embed, layer 0, ..., layer L-1, head]`` sharing ``gpt``'s modules (:meth:`GPT.pipeline_blocks`)."""
    return gpt.pipeline_blocks()
