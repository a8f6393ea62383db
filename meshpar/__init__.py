"""meshpar: JAX-style sharding on PyTorch."""
from .errors import ShardingError, CollectiveTimeout
from .mesh import Mesh, CommCounter, current_mesh
from . import mesh

__all__ = ["ShardingError", "CollectiveTimeout", "Mesh", "CommCounter", "current_mesh", "mesh"]
