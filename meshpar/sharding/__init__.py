"""Partition specs, layouts, ShardedTensor, the dispatcher, resharding and shard_map."""
from .spec import P, Zigzag
from .tensor import ShardedTensor, is_sharded
from .api import shard, from_local, unshard, reshard
from .shard_map import shard_map
from .core import tracked
from . import grad_api  # noqa: F401  (registers the autograd-API rules)
from .layout import local_shape, block_slices, block_offsets, block_offset, block_positions, take_block, validate

__all__ = ["P", "Zigzag", "ShardedTensor", "is_sharded", "shard", "from_local", "unshard", "reshard", "shard_map", "tracked",
           "local_shape", "block_slices", "block_offsets", "block_offset", "block_positions", "take_block", "validate"]
