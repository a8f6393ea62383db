"""Modules and functional layers over sharded ops; the layout comes from specs, not class names.

Importing this package registers the layer op rules (``F.layer_norm``, ``F.rms_norm``,
``F.embedding``, ``F.cross_entropy``, ``F.dropout`` on ShardedTensors) with the dispatcher.
"""
from ..ops import cross_entropy as _ce, dropout as _do, embedding as _emb, norms as _norms  # noqa: F401 (rules)
from . import functional
from .layers import CausalSelfAttention, CrossEntropyLoss, Dropout, Embedding, LayerNorm, Linear, Linear2D, RMSNorm

__all__ = ["functional", "Linear", "Linear2D", "LayerNorm", "RMSNorm", "Embedding", "Dropout", "CausalSelfAttention",
           "CrossEntropyLoss"]
