"""Memory: heterogeneous (device/host) chunk memory, activation checkpointing, accounting.

* :func:`offload` / :class:`Offload`: train a model larger than the device (chunked parameters,
  gradients in the parameter chunks, hybrid device/host AdamW, ZeRO over ``data``, tensor-parallel
  ShardedTensor parameters as their local blocks, gradient clipping); see docs/memory.md.
* :func:`checkpoint_activations`: activation checkpointing from outside the model.
* :func:`report`: where every chunk lives; :func:`memory_report`: bytes of model states per rank.
"""
from .checkpoint import checkpoint_activations
from .chunk import Chunk, TensorState
from .device import CudaDevice, SimulatedDevice
from .manager import ChunkManager, MemoryPlacementError
from .offload import Offload, offload
from .report import ChunkReport, MemoryReport, memory_report, report

__all__ = ["offload", "Offload", "checkpoint_activations", "report", "ChunkReport", "MemoryReport",
           "memory_report", "Chunk", "TensorState", "ChunkManager", "MemoryPlacementError", "SimulatedDevice",
           "CudaDevice"]
