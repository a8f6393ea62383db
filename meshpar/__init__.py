"""meshpar: JAX-style sharding on PyTorch.

>>> mesh = meshpar.Mesh((2, 2), ("x", "y"))
>>> x = meshpar.shard(torch.randn(8, 6), P("x", "y"), mesh)
"""
from .errors import ShardingError, CollectiveTimeout
from .mesh import Mesh, CommCounter, current_mesh
from . import mesh
from .sharding import P, Zigzag, ShardedTensor, shard, from_local, unshard, reshard, shard_map, tracked
from .sharding.collectives_by_name import (psum, pmean, pmax, pmin, pvary, all_gather, psum_scatter, all_to_all,
                                           ppermute, axis_index, axis_size)
from .sharding.semantics import strict, debug_checks
from .sharding.generic import manual_seed
from . import ops  # registers the op rules

__all__ = ["ShardingError", "CollectiveTimeout", "Mesh", "CommCounter", "current_mesh", "mesh",
           "P", "Zigzag", "ShardedTensor", "shard", "from_local", "unshard", "reshard", "shard_map", "tracked", "ops",
           "psum", "pmean", "pmax", "pmin", "pvary", "all_gather", "psum_scatter", "all_to_all", "ppermute",
           "axis_index", "axis_size", "strict", "debug_checks", "manual_seed"]


def __getattr__(name):
    # subpackages owned by later layers load on first use (meshpar.nn, meshpar.optim, ...)
    import importlib
    if name in {"nn", "optim", "pipeline", "memory", "train", "models", "testing"}:
        return importlib.import_module(f".{name}", __name__)
    if name in {"launch", "launch_from_torch", "launch_from_slurm", "initialize", "Trainer", "Engine",
                "get_dataloader"}:
        return getattr(importlib.import_module(".train", __name__), name)
    if name in {"parallelize", "constrain", "Layouts", "Style", "load_dense", "save_dense"}:
        return getattr(importlib.import_module(".parallel", __name__), name)
    if name == "memory_report":
        return importlib.import_module(".memory", __name__).memory_report
    raise AttributeError(f"module 'meshpar' has no attribute {name!r}")
