"""Sharded, re-layoutable, atomic checkpoints on ``torch.distributed.checkpoint`` (DCP).

Each rank writes the local block of every tensor together with the block's offsets inside the
global tensor (DCP chunk metadata). Replicated blocks are written once (DCP deduplicates equal
chunk indices). Loading re-slices: each rank asks DCP for the region its *current* layout owns,
whatever layout wrote the checkpoint — 2D 2x2 -> 1D 4 -> one process all read the same files.

Layout of a checkpoint folder ``root``::

    root/step_00000100/       .metadata + *.distcp (DCP), extra_rank<r>.pt, meta.json
    root/latest               the name of the newest complete step folder

A save goes to ``step_XXXXXXXX.tmp`` and is renamed only after every rank has finished, so a
process killed mid-save leaves the previous checkpoint as ``latest``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import (DefaultLoadPlanner, DefaultSavePlanner,
                                                          create_default_local_load_plan,
                                                          create_default_local_save_plan)
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex,
                                                   TensorProperties, TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list


@dataclasses.dataclass
class Block:
    """The part ``local`` of a global tensor of ``global_shape`` starting at ``offsets``."""

    local: torch.Tensor
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]

    def __post_init__(self) -> None:
        self.global_shape = tuple(int(s) for s in self.global_shape)
        self.offsets = tuple(int(o) for o in self.offsets)
        if len(self.offsets) != self.local.ndim or len(self.global_shape) != self.local.ndim:
            raise ValueError(f"Block: offsets {self.offsets} / global shape {self.global_shape} do not match a "
                             f"{self.local.ndim}-d local block")
        for d, (o, n, g) in enumerate(zip(self.offsets, self.local.shape, self.global_shape)):
            if o < 0 or o + n > g:
                raise ValueError(f"Block: dim {d} covers [{o}, {o + n}) outside the global size {g}")


def as_block(t: torch.Tensor | Block) -> Block:
    """A :class:`Block` for a ShardedTensor (its local block), a Block, or a plain (full) tensor.

    A ShardedTensor that is unreduced (a partial sum) is summed first: checkpoints store values,
    never partial blocks."""
    if isinstance(t, Block):
        return t
    spec = getattr(t, "spec", None)
    mesh = getattr(t, "mesh", None)
    if spec is not None and mesh is not None and hasattr(t, "_local"):
        from ..sharding.layout import block_slices  # the sharding core (lazy: train sits above it)

        if spec.unreduced:
            # a partial sum is not a value: sum it (a collective, called by every rank as saving is)
            from ..sharding.api import reshard
            with torch.no_grad():
                t = reshard(t.detach(), spec.reduced())
            spec = t.spec
        slices = block_slices(tuple(t.shape), spec, mesh)
        offsets = tuple(s.start or 0 if isinstance(s, slice) else int(s[0]) for s in slices)
        return Block(t._local, tuple(t.shape), offsets)
    t = t.detach()
    return Block(t, tuple(t.shape), (0,) * t.ndim)


def _chunk(b: Block) -> ChunkStorageMetadata:
    return ChunkStorageMetadata(offsets=torch.Size(b.offsets), sizes=torch.Size(b.local.shape))


class _BlockSavePlanner(DefaultSavePlanner):
    """Writes every :class:`Block` as a DCP chunk at its global offsets."""

    def __init__(self, blocks: dict[str, Block]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.blocks = blocks

    def create_local_plan(self) -> SavePlan:
        rest = {k: v for k, v in self.state_dict.items() if k not in self.blocks}
        plan = create_default_local_save_plan(rest, self.is_coordinator)
        items = list(plan.items)
        for fqn, b in self.blocks.items():
            items.append(WriteItem(
                index=MetadataIndex(fqn, torch.Size(b.offsets)), type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(chunk=_chunk(b), properties=TensorProperties.create_from_tensor(b.local),
                                            size=torch.Size(b.global_shape))))
        self.plan = dataclasses.replace(plan, items=items)
        return self.plan

    def lookup_object(self, index: MetadataIndex) -> Any:
        if index.fqn in self.blocks:
            return self.blocks[index.fqn].local.detach().contiguous()
        return super().lookup_object(index)


class _BlockLoadPlanner(DefaultLoadPlanner):
    """Reads into every :class:`Block` the region of the saved global tensor it covers."""

    def __init__(self, blocks: dict[str, Block]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.blocks = blocks

    def create_local_plan(self) -> LoadPlan:
        md: Metadata = self.metadata  # type: ignore[assignment]
        rest = {k: v for k, v in self.state_dict.items() if k not in self.blocks}
        plan = create_default_local_load_plan(rest, md, True)
        items = list(plan.items)
        for fqn, b in self.blocks.items():
            smd = md.state_dict_metadata.get(fqn)
            if not isinstance(smd, TensorStorageMetadata):
                raise KeyError(f"checkpoint has no tensor {fqn!r}")
            if tuple(smd.size) != b.global_shape:
                raise ValueError(f"checkpoint tensor {fqn!r} has global shape {tuple(smd.size)}, the model's is "
                                 f"{b.global_shape}; the model config differs from the one that saved it")
            items += create_read_items_for_chunk_list(fqn, smd, [_chunk(b)])
        return dataclasses.replace(plan, items=items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        if index.fqn in self.blocks:
            return self.blocks[index.fqn].local
        return super().lookup_tensor(index)


@dataclasses.dataclass(frozen=True)
class _Group:
    """Who takes part in a save/load: the ranks of ``mesh`` (default: the whole world)."""

    pg: Any
    rank: int
    size: int

    @property
    def no_dist(self) -> bool:
        return self.size == 1

    @contextlib.contextmanager
    def quiet(self):
        """Silence DCP's 'assuming a single process' warning when that is the intent."""
        with warnings.catch_warnings():
            if self.no_dist:
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            yield

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier(group=self.pg)


def _group(mesh: Any = None) -> _Group:
    if not (dist.is_available() and dist.is_initialized()):
        return _Group(None, 0, 1)
    if mesh is None:
        return _Group(dist.group.WORLD, dist.get_rank(), dist.get_world_size())
    if mesh.size() == 1:
        return _Group(None, 0, 1)
    pg = mesh.group(mesh.names)
    return _Group(pg, dist.get_rank(pg), mesh.size())


def step_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def _is_complete(p: Path) -> bool:
    return p.is_dir() and (p / ".metadata").exists() and (p / "meta.json").exists() and not p.name.endswith(".tmp")


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder under ``root`` (None when there is none)."""
    root = Path(root)
    if not root.is_dir():
        return None
    ptr = root / "latest"
    if ptr.exists():
        p = root / ptr.read_text().strip()
        if _is_complete(p):
            return p
    done = sorted(p for p in root.glob("step_*") if _is_complete(p))
    return done[-1] if done else None


def save_checkpoint(root: str | os.PathLike, step: int, tensors: Mapping[str, torch.Tensor | Block],
                    extra: Mapping[str, Any] | None = None, keep: int | None = 3, mesh: Any = None,
                    _after_write: Callable[[], None] | None = None) -> Path:
    """Save ``tensors`` (ShardedTensors, Blocks or plain tensors, flat names) and per-rank ``extra``.

    Collective over the ranks of ``mesh`` (default: the whole world). Returns the final folder.

    Args:
        extra: small per-rank picklable state (step, data position, RNG, scheduler...).
        keep: how many complete checkpoints to keep (None keeps all).
        _after_write: test hook called after the files are written and before the rename.
    """
    g = _group(mesh)
    rank, world = g.rank, g.size
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        Path(root).mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # a save that was killed earlier
        tmp.mkdir()
    g.barrier()
    blocks = {k: as_block(v) for k, v in tensors.items()}
    state = {k: b.local for k, b in blocks.items()}
    with g.quiet():
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp)), planner=_BlockSavePlanner(blocks),
                 process_group=g.pg, no_dist=g.no_dist)
    torch.save(dict(extra or {}), tmp / f"extra_rank{rank}.pt")
    if _after_write is not None:
        _after_write()
    g.barrier()
    if rank == 0:
        (tmp / "meta.json").write_text(json.dumps({"step": step, "world_size": world, "time": time.time(),
                                                   "keys": sorted(tensors)}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        ptr_tmp = Path(root) / "latest.tmp"
        ptr_tmp.write_text(final.name)
        os.replace(ptr_tmp, Path(root) / "latest")
        if keep is not None:
            done = sorted(p for p in Path(root).glob("step_*") if _is_complete(p))
            for old in done[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    g.barrier()
    return final


def checkpoint_metadata(path: str | os.PathLike) -> Metadata:
    """DCP metadata of a checkpoint folder (global shapes and dtypes of every tensor)."""
    return dcp.FileSystemReader(str(path)).read_metadata()


def load_checkpoint(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor | Block],
                    mesh: Any = None) -> dict[str, Any]:
    """Load into ``tensors`` (in place, any layout) and return this rank's ``extra``.

    Collective over the ranks of ``mesh`` (default: the whole world).
    The extra state of the same rank is returned when the world size is unchanged; otherwise
    rank 0's, without its ``"rng"`` entry (RNG streams do not carry over to another layout).
    """
    path = Path(path)
    blocks = {k: as_block(v) for k, v in tensors.items()}
    state = {k: b.local for k, b in blocks.items()}
    g = _group(mesh)
    with torch.no_grad(), g.quiet():
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(path)), planner=_BlockLoadPlanner(blocks),
                 process_group=g.pg, no_dist=g.no_dist)
    rank, world = g.rank, g.size
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("world_size") == world and (path / f"extra_rank{rank}.pt").exists():
        return torch.load(path / f"extra_rank{rank}.pt", weights_only=False)
    extra = torch.load(path / "extra_rank0.pt", weights_only=False)
    extra.pop("rng", None)
    return extra


def load_full(path: str | os.PathLike, prefix: str = "", mesh: Any = None) -> dict[str, torch.Tensor]:
    """Every tensor under ``prefix`` as a full (global) tensor. Collective over ``mesh``'s ranks."""
    md = checkpoint_metadata(path)
    out = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype)
           for k, v in md.state_dict_metadata.items()
           if k.startswith(prefix) and isinstance(v, TensorStorageMetadata)}
    blocks = {k: Block(t, tuple(t.shape), (0,) * t.ndim) for k, t in out.items()}
    g = _group(mesh)
    with torch.no_grad(), g.quiet():
        dcp.load(dict(out), storage_reader=dcp.FileSystemReader(str(path)), planner=_BlockLoadPlanner(blocks),
                 process_group=g.pg, no_dist=g.no_dist)
    return {k[len(prefix):]: v for k, v in out.items()}


def export_safetensors(path: str | os.PathLike, out_file: str | os.PathLike, prefix: str = "model.",
                       mesh: Any = None) -> Path:
    """Write the full weights of a checkpoint (tensors under ``prefix``) to one safetensors file."""
    from safetensors.torch import save_file

    full = load_full(path, prefix, mesh)
    g = _group(mesh)
    out_file = Path(out_file)
    if g.rank == 0:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in full.items()}, str(out_file))
    g.barrier()
    return out_file
