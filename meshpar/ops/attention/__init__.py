"""Sequence-parallel attention: ring attention (load-balanced causal, overlapped) and all-to-all.

* :func:`sp_attention` / :func:`sp_attention_bsh`: attention of sequence-sharded local blocks.
* :func:`sequence_parallel`: choose the variant for a block of code (context variable).
* :func:`zigzag_permute` / :func:`zigzag_unpermute`: the balanced causal layout of global tensors
  (ShardedTensors use the spec tag ``meshpar.Zigzag("sp")`` instead).
* ``scaled_dot_product_attention`` on ShardedTensors sharded on dim 2 dispatches here (see :mod:`.rule`).
"""
from .api import sp_attention, sp_attention_bsh
from .block import block_backward, block_forward, merge_, select_impl
from .layout import (Block, chunk_ids, pad_to_multiple, rank_work, step_blocks, zigzag_index, zigzag_permute,
                     zigzag_unpermute)
from .options import SPOptions, current_options, sequence_parallel
from .ring import RingAttention
from .trace import attention_trace
from .ulysses import all_to_all_attention

__all__ = ["sp_attention", "sp_attention_bsh", "sequence_parallel", "SPOptions", "current_options",
           "zigzag_permute", "zigzag_unpermute", "zigzag_index", "pad_to_multiple", "chunk_ids", "step_blocks",
           "rank_work", "Block", "block_forward", "block_backward", "merge_", "select_impl", "RingAttention",
           "all_to_all_attention", "attention_trace"]

from . import rule  # noqa: E402,F401  (registers the SDPA rule)
