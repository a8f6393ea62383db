"""``parallel.pipeline > 1`` in the engine: the model's blocks in a :class:`~meshpar.pipeline.Pipeline`,
and its parameters named as in the whole model.

The model given to :func:`~meshpar.train.engine.initialize` is split into blocks:

* a module with a ``pipeline_blocks()`` method (e.g. :class:`meshpar.models.GPT`, parallelized
  first): its blocks, which share its parameters; parameters keep the model's own names
  (``"wte.weight"``, ``"h.0.attn.q.weight"``), so checkpoints and exported weights are those of the un-pipelined
  model and load in any layout, pipelined or not;
* a list / ``nn.Sequential`` / ``nn.ModuleList`` of blocks: parameters are named as in
  ``nn.Sequential(*blocks)`` (``"<block index>.<name>"``).

Each rank holds only its stages' parameters; :class:`PipelineSetup` keeps the names of all of them,
so a checkpoint (written by all pipe ranks together) loads on each rank with the part it owns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn

from ..sharding.tensor import ShardedTensor
from .batch import place, place_batch
from .config import ConfigError
from .launch import Context


@dataclass
class PipelineSetup:
    """The pipeline of an engine and the names of its parameters.

    Attributes:
        pipe: this rank's stages and the schedule.
        named: an empty module tree holding this rank's parameters under their whole-model names
            (what ZeRO and the checkpoints see).
        all_names: every parameter name of the whole model (all stages).
        source: the model as given to ``initialize`` (for :meth:`gather`).
    """

    pipe: Any
    named: nn.Module
    all_names: frozenset[str]
    source: Any

    def blocks(self) -> list[Any]:
        """The full block list of :attr:`source` (same parameters as the pipeline's blocks)."""
        return split_blocks(self.source)[0]

    def gather(self) -> Any:
        """:attr:`source` with every stage's trained parameters copied into it, on every rank
        (:meth:`~meshpar.pipeline.Pipeline.gather_blocks`). Collective over the pipe axis.

        A module source is first moved to the pipeline's device and to the dtype its stages compute
        in (bf16/fp16 under mixed precision), so all its parameters agree."""
        if isinstance(self.source, nn.Module):
            local = [getattr(p, "_local", p) for p in self.pipe.parameters()]
            dtype = next((t.dtype for t in local if t.is_floating_point()), None)
            self.source.to(device=self.pipe.mesh.device, dtype=dtype)
        self.pipe.gather_blocks(self.blocks())
        return self.source


def _placing(blocks: list[Any], criterion: Callable, ctx: Context) -> tuple[list[Any], Callable]:
    """Place each micro-batch (first block's input) and its targets (criterion) as the data rank's block."""
    mesh = ctx.mesh
    first = blocks[0]
    if isinstance(first, nn.Module):
        # a hook, not a wrapper: the block keeps its parameter names
        first.register_forward_pre_hook(lambda _m, args: place_batch(args, mesh), prepend=True)
    else:
        blocks = [lambda x, _f=first: _f(place(x, mesh))] + list(blocks[1:])

    def crit(out: Any, y: Any) -> Any:
        return criterion(out, place(y, mesh) if isinstance(out, ShardedTensor) else y)
    return blocks, crit


def split_blocks(model: Any) -> tuple[list[Any], dict[int, str] | None]:
    """``(blocks, names)``: the model's blocks and, for a ``pipeline_blocks()`` model, ``id(param) -> name``."""
    if callable(getattr(model, "pipeline_blocks", None)):
        return list(model.pipeline_blocks()), {id(p): n for n, p in model.named_parameters()}
    if isinstance(model, (nn.Sequential, nn.ModuleList, list, tuple)):
        return list(model), None
    raise ConfigError("parallel.pipeline > 1 needs the model as a sequence of blocks (a list, nn.Sequential or "
                      "nn.ModuleList, or a factory returning one), each mapping one tensor to one tensor, or a "
                      "module with a pipeline_blocks() method such as meshpar.models.GPT")


def register_dotted(module: nn.Module, name: str, param: nn.Parameter) -> None:
    """Register ``param`` under the dotted ``name`` (``"h.0.ln_1.weight"``), creating empty
    sub-modules on the way, so ``module.named_parameters()`` yields ``name``."""
    *path, leaf = name.split(".")
    mod = module
    for part in path:
        if not hasattr(mod, part):
            mod.add_module(part, nn.Module())
        mod = getattr(mod, part)
    mod.register_parameter(leaf, param)


def build_pipeline(model: Any, criterion: Callable | None, ctx: Context) -> PipelineSetup:
    """A :class:`~meshpar.pipeline.Pipeline` over the config's ``pipe`` axis, with ``pipeline_schedule``
    options. Gradients are left to the optimizer wrapper (``data_axes=None``; ZeRO's ``no_sync``).

    With ShardedTensor parameters, each micro-batch is placed as this data rank's block
    (``from_local(x, P("data"))``, :mod:`meshpar.train.batch`) by a forward pre-hook on the first
    block, and the targets likewise before the criterion."""
    from ..pipeline import Pipeline
    from ..pipeline.blocks import as_module

    if criterion is None:
        raise ConfigError("parallel.pipeline > 1 needs a criterion: the last stage applies it per micro-batch")
    if ctx.config.gradient_accumulation != 1:
        raise ConfigError("with parallel.pipeline > 1 use pipeline_schedule.num_microbatches instead of "
                          "gradient_accumulation")
    if ctx.config.zero_stage == 3:
        raise ConfigError("zero.stage=3 gathers parameters with module hooks and is not supported with "
                          "parallel.pipeline > 1; use zero.stage 0, 1 or 2")
    blocks, ids = split_blocks(model)
    if any(isinstance(p, ShardedTensor) for b in blocks if isinstance(b, nn.Module) for p in b.parameters()):
        blocks, criterion = _placing(blocks, criterion, ctx)
    opts = dict(ctx.config.get("pipeline_schedule") or {})
    opts.setdefault("schedule", "1f1b")
    pipe = Pipeline(blocks, ctx.mesh, criterion, schedule=opts.pop("schedule"),
                    num_microbatches=int(opts.pop("num_microbatches", ctx.config.parallel.pipeline)),
                    data_axes=None, **opts).to(ctx.device)
    if ids is None:
        mine = list(pipe.named_block_parameters())
        all_names = {f"{i}.{n}" for i, b in enumerate(blocks) for n, _ in as_module(b, i).named_parameters()}
    else:
        mine = [(ids[id(p)], p) for p in pipe.parameters()]
        all_names = set(ids.values())
    named = nn.Module()
    for n, p in mine:
        register_dotted(named, n, p)
    return PipelineSetup(pipe, named, frozenset(all_names), model)
