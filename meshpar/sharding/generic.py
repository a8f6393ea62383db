"""Exact layout moves used below autograd: global values, blocks in a target layout, write-backs,
and the shared random stream.

Everything here works on raw blocks with non-differentiable collectives: it runs inside
``__torch_dispatch__`` (below autograd, where the autograd engine already recorded the op) or
under ``no_grad``.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from ..errors import ShardingError
from ..mesh import Mesh, collectives as C
from .layout import take_block
from .reshard import plan, run_steps
from .semantics import implicit
from .spec import P
from .tensor import ShardedTensor

_COMM_STEPS = frozenset({"psum", "reduce_scatter", "all_gather", "all_to_all"})


def _moves(src: P, tgt: P, ndim: int, op: str, mesh: Mesh):
    steps = plan(src, tgt, ndim)
    if any(s.kind in _COMM_STEPS for s in steps):
        implicit(op, f"{src} -> {tgt}", mesh)
    return steps


def global_value(x: ShardedTensor, op: str = "op") -> torch.Tensor:
    """The global value of ``x`` as a plain tensor on every rank (partial sums summed, blocks gathered)."""
    if not x.spec.entries and not x.spec.unreduced:
        return x._local
    steps = _moves(x.spec, P(), len(x._gshape), op, x.mesh)
    return run_steps(x._local, steps, x.mesh, differentiable=False)


def block_as(x: ShardedTensor, tgt: P, op: str = "op") -> torch.Tensor:
    """``x``'s block re-laid out as ``tgt`` (same global shape; cheapest collectives)."""
    if x.spec == tgt:
        return x._local
    steps = _moves(x.spec, tgt, len(x._gshape), op, x.mesh)
    return run_steps(x._local, steps, x.mesh, differentiable=False)


def aligned_spec(shape: Sequence[int], out_spec: P, out_ndim: int, unreduced=()) -> P:
    """The layout an operand of ``shape`` needs to feed a broadcasting op producing ``out_spec``."""
    off = out_ndim - len(shape)
    ents = []
    for d, n in enumerate(shape):
        ax = out_spec.axes_of(off + d) if n != 1 else ()
        ents.append(ax or None)
    return P(*ents, unreduced=unreduced)


def operand_block(x, out_spec: P, out_ndim: int, mesh: Mesh, keep_unreduced=(), op: str = "op"):
    """The block of operand ``x`` (ShardedTensor, plain tensor, number) for a result laid out as ``out_spec``.

    A replicated or plain operand is sliced for free; an operand split differently is resharded
    (an implicit collective); a partial operand is summed unless ``keep_unreduced`` says it stays.
    """
    if isinstance(x, ShardedTensor):
        keep = tuple(keep_unreduced) if x.spec.unreduced else ()
        return block_as(x, aligned_spec(x._gshape, out_spec, out_ndim, keep), op)
    if isinstance(x, torch.Tensor) and x.ndim:
        return take_block(x, aligned_spec(x.shape, out_spec, out_ndim), mesh)
    return x


def value_block(value: torch.Tensor, spec: P, mesh: Mesh) -> torch.Tensor:
    """The block that a tensor laid out as ``spec`` holds for the global ``value``.

    Over unreduced axes the value sits on index 0 and the other ranks hold zeros (their sum is the value)."""
    blk = take_block(value, spec.reduced(), mesh)
    if spec.unreduced and mesh.axis_index(spec.unreduced) != 0:
        blk = torch.zeros_like(blk)
    return blk


def write_value(x: ShardedTensor, value: torch.Tensor) -> None:
    """Store the global ``value`` into ``x``'s block (in place; ``x`` keeps its layout)."""
    blk = value_block(value, x.spec, x.mesh)
    if blk.data_ptr() != x._local.data_ptr() or blk.shape != x._local.shape:
        x._local.copy_(blk)


def common_mesh(sts: Sequence[ShardedTensor]) -> Mesh:
    mesh = sts[0].mesh
    for s in sts[1:]:
        if s.mesh != mesh:
            raise ShardingError(f"operands live on different meshes ({mesh} and {s.mesh}); "
                                "reshard them onto one mesh (unshard + shard) first")
    return mesh


# ---------------------------------------------------------------------------- random stream
def manual_seed(seed: int, mesh: Mesh | None = None) -> None:
    """Seed the shared random stream of ``mesh`` (default: the current mesh). Call it on every rank
    with the same ``seed``: random ops on ShardedTensors (``rand_like``, ``uniform_``, ``bernoulli``,
    ``F.dropout``, ...) then draw the same global values on every rank, for every layout, however
    torch's own generators were seeded on each rank."""
    from ..mesh import current_mesh
    mesh = current_mesh(mesh)
    mesh._rng_state = [int(seed), 0]


def next_seed(mesh: Mesh) -> int:
    """The seed of the next random op on ``mesh``, equal on every rank.

    After :func:`manual_seed`: a counter-based stream owned by the mesh (advanced identically on
    every rank, no communication). Without it: one draw from torch's default generator, which is
    equal on every rank when the ranks were seeded alike (torch's default seed is fixed, or call
    ``torch.manual_seed(s)`` with the same ``s`` everywhere)."""
    st = getattr(mesh, "_rng_state", None)
    if st is None:
        return int(torch.randint(0, 2**62, (1,)).item())
    st[1] += 1
    return (st[0] * 1_000_003 + st[1] * 7_919) & ((1 << 62) - 1)


@contextlib.contextmanager
def shared_rng(mesh: Mesh, device: torch.device):
    """Run the block with torch's generator for ``device`` seeded from the mesh's shared stream
    (the caller's generator state is restored after)."""
    seed = next_seed(mesh)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.manual_seed(seed)
        yield
