"""Pipeline stages that build only their own layers.

::

    blocks = build_stage(lambda: make_blocks(cfg), mesh, load=state_dict)    # meta + this rank's blocks
    pipe = Pipeline(blocks, mesh, loss_fn, partition="uniform")               # keeps only its own chunks

``make_blocks`` runs under ``torch.device("meta")``: every parameter is a shape without storage.
The blocks are partitioned exactly as :class:`~meshpar.pipeline.Pipeline` will partition them
(same ``partition`` and ``chunks``), and only the blocks of this pipe rank's virtual stages are
materialized, on ``device``, from ``load`` (a mapping or a function) or ``init``. Parameters,
gradients and optimizer state of other stages therefore never exist on this rank; the other
blocks stay on the meta device (their shapes still drive ``partition="parameters"``).

Names: block ``i``'s parameter ``name`` is ``f"{i}.{name}"``, the names of
``nn.Sequential(*blocks)`` and of :meth:`Pipeline.named_block_parameters`.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
import torch.nn as nn

from ..errors import ShardingError
from ..mesh.mesh import Mesh, current_mesh
from .partition import partition as make_partition

Loader = Mapping[str, torch.Tensor] | Callable[[str, torch.Tensor], None]


def stage_block_indices(n_blocks: int, pipe_size: int, pipe_rank: int, chunks: int = 1,
                        partition: str | Sequence[int] = "uniform", blocks: Sequence[object] | None = None) -> list[int]:
    """Indices of the blocks that pipe rank ``pipe_rank`` runs (all its virtual stages)."""
    ranges = make_partition(blocks if blocks is not None else n_blocks, pipe_size * chunks, partition)
    return [i for s, (lo, hi) in enumerate(ranges) if s % pipe_size == pipe_rank for i in range(lo, hi)]


def materialize(module: nn.Module, device: torch.device | str, load: Loader | None = None,
                init: Callable[[str, torch.Tensor], None] | None = None, prefix: str = "") -> int:
    """Give every meta parameter and buffer of ``module`` storage on ``device``; returns the bytes made.

    Values come from ``load`` (``load[prefix + name]``, or ``load(prefix + name, tensor)`` filling
    in place), else ``init(prefix + name, tensor)``, else the module's ``reset_parameters()``.
    Tied parameters stay tied (one new tensor per old one).
    Raises:
        ShardingError: a name missing from ``load``, or a shape that differs.
    """
    made: dict[int, torch.Tensor] = {}
    nbytes = 0
    for mname, sub in module.named_modules():
        for table in (sub._parameters, sub._buffers):
            for key, old in list(table.items()):
                if old is None or not old.is_meta:
                    continue
                name = f"{prefix}{mname + '.' if mname else ''}{key}"
                if id(old) not in made:
                    new = torch.empty(old.shape, dtype=old.dtype, device=device)
                    with torch.no_grad():
                        if isinstance(load, Mapping):
                            if name not in load:
                                raise ShardingError(f"build_stage: no value for {name} in load (have e.g. "
                                                    f"{list(load)[:3]})")
                            src = load[name]
                            if tuple(src.shape) != tuple(old.shape):
                                raise ShardingError(f"build_stage: {name} has shape {tuple(src.shape)} in load, "
                                                    f"the model wants {tuple(old.shape)}")
                            new.copy_(src)
                        elif load is not None:
                            load(name, new)
                        elif init is not None:
                            init(name, new)
                    made[id(old)] = nn.Parameter(new, requires_grad=old.requires_grad) \
                        if isinstance(old, nn.Parameter) else new
                    nbytes += new.numel() * new.element_size()
                table[key] = made[id(old)]
    if load is None and init is None:
        for sub in module.modules():
            if hasattr(sub, "reset_parameters"):
                sub.reset_parameters()
    return nbytes


def build_stage(make_blocks: Callable[[], Sequence[nn.Module]], mesh: Mesh | None = None, *,
                load: Loader | None = None, init: Callable[[str, torch.Tensor], None] | None = None,
                device: torch.device | str | None = None, chunks: int = 1,
                partition: str | Sequence[int] = "uniform", pipe_axis: str = "pipe") -> list[nn.Module]:
    """Build ``make_blocks()`` on the meta device and materialize only this pipe rank's blocks.

    Args:
        make_blocks: returns the model as a sequence of ``nn.Module`` blocks (called under
            ``torch.device("meta")``).
        load / init: where the values come from (see :func:`materialize`); names are
            ``f"{block index}.{parameter name}"``.
        device: where this rank's blocks live (default the mesh's device).
        chunks, partition, pipe_axis: as given to :class:`~meshpar.pipeline.Pipeline`.
    Returns:
        The full block list: this rank's blocks real, the others on the meta device.
    """
    mesh = current_mesh(mesh)
    if pipe_axis not in mesh.names:
        raise ShardingError(f"build_stage: mesh {mesh} has no pipeline axis {pipe_axis!r}")
    with torch.device("meta"):
        blocks = list(make_blocks())
    for i, b in enumerate(blocks):
        if not isinstance(b, nn.Module):
            raise ShardingError(f"build_stage: block {i} is a {type(b).__name__}; give nn.Module blocks")
    own = stage_block_indices(len(blocks), mesh.size(pipe_axis), mesh.coord(pipe_axis), chunks, partition, blocks)
    dev = device if device is not None else mesh.device
    for i in own:
        materialize(blocks[i], dev, load, init, prefix=f"{i}.")
    return blocks


def materialized_bytes(module: nn.Module) -> int:
    """Bytes of parameters with storage (meta parameters count 0), each tensor once."""
    seen, n = set(), 0
    for p in module.parameters():
        if p.is_meta or id(p) in seen:
            continue
        seen.add(id(p))
        n += p.numel() * p.element_size()
    return n
