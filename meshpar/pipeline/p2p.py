"""Point-to-point transfer of stage activations over the ``pipe`` axis.

An activation is a tensor; a meshpar ``ShardedTensor`` (tensor parallelism inside a stage) is
sent as its local block and re-wrapped with the same spec on the receiver. Before the first
activation on a (chunk) link, the sender sends a fixed-size metadata message (local shape,
dtype, spec and global shape, pickled); the receiver caches it, so later steps allocate
receive buffers without any handshake. Gradients flow back with the shape of the activation,
which the sender of that activation already knows, so they need no metadata.

All transfers go through :mod:`meshpar.mesh.collectives` (``send``/``recv``, async).
"""
from __future__ import annotations

import dataclasses
import pickle
from typing import Any

import torch

from ..errors import ShardingError
from ..mesh import collectives as C
from ..mesh.mesh import Mesh
from ..sharding import ShardedTensor, from_local

META_BYTES = 2048


@dataclasses.dataclass(frozen=True)
class TensorMeta:
    """What a receiver needs to allocate and re-wrap an activation."""

    local_shape: tuple[int, ...]
    dtype: torch.dtype
    spec: Any = None             # meshpar P for a ShardedTensor, else None
    global_shape: tuple[int, ...] | None = None


def is_sharded(x: object) -> bool:
    """True for a meshpar ShardedTensor."""
    return isinstance(x, ShardedTensor)


def local_block(x: torch.Tensor) -> torch.Tensor:
    """The plain tensor to send: the local block of a ShardedTensor, else ``x`` itself (detached)."""
    return (x._local if is_sharded(x) else x).detach()


def autograd_local(x: torch.Tensor) -> torch.Tensor:
    """The autograd-connected plain tensor behind ``x`` (``x.local`` for a ShardedTensor)."""
    return x.local if is_sharded(x) else x


def meta_of(x: torch.Tensor) -> TensorMeta:
    if not isinstance(x, torch.Tensor):
        raise ShardingError(
            f"a pipeline stage must return one tensor to pass to the next stage, got {type(x).__name__}; "
            "pack several values into one tensor or move the split point")
    if is_sharded(x):
        return TensorMeta(tuple(x._local.shape), x._local.dtype, x.spec, tuple(x.shape))
    return TensorMeta(tuple(x.shape), x.dtype)


def encode_meta(meta: TensorMeta, device: torch.device) -> torch.Tensor:
    raw = pickle.dumps(meta)
    if len(raw) > META_BYTES - 8:
        raise ShardingError(f"activation metadata is {len(raw)} bytes, more than the {META_BYTES - 8} allowed")
    buf = torch.zeros(META_BYTES, dtype=torch.uint8)
    buf[:8] = torch.tensor(list(len(raw).to_bytes(8, "little")), dtype=torch.uint8)
    buf[8:8 + len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return buf.to(device)


def decode_meta(buf: torch.Tensor) -> TensorMeta:
    b = bytes(buf.cpu().tolist())
    n = int.from_bytes(b[:8], "little")
    return pickle.loads(b[8:8 + n])


def wrap_received(leaf: torch.Tensor, meta: TensorMeta, mesh: Mesh) -> torch.Tensor:
    """Re-wrap a received block: a ShardedTensor with the sender's spec, or the plain tensor."""
    if meta.spec is None:
        return leaf
    return from_local(leaf, meta.spec, mesh, shape=meta.global_shape)


def send_async(x: torch.Tensor, mesh: Mesh, axis: str, dst: int):
    return C.send(x, mesh, axis, dst, async_op=True)


def recv_async(buf: torch.Tensor, mesh: Mesh, axis: str, src: int):
    return C.recv(buf, mesh, axis, src, async_op=True)


def send_meta(meta: TensorMeta, mesh: Mesh, axis: str, dst: int):
    return send_async(encode_meta(meta, mesh.device), mesh, axis, dst)


def recv_meta(mesh: Mesh, axis: str, src: int) -> TensorMeta:
    buf = torch.empty(META_BYTES, dtype=torch.uint8, device=mesh.device)
    return decode_meta(recv_async(buf, mesh, axis, src).wait())
