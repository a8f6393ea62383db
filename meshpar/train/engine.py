"""``initialize`` and :class:`Engine`: the model, optimizer and criterion wired for the config.

``initialize`` builds (or takes) the model, wraps the optimizer with
:func:`meshpar.optim.zero` (data parallelism / ZeRO stage from the config, bf16/fp16 compute
with fp32 masters, gradient clipping) and returns an :class:`Engine` whose
``zero_grad/__call__/criterion/backward/step`` also handle gradient accumulation.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_map

from ..ops.attention.options import sequence_parallel
from ..sharding.tensor import ShardedTensor
from . import batch as B
from .config import ConfigError
from .launch import Context, current_context
from .pipe import PipelineSetup, build_pipeline

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

ModelLike = nn.Module | Callable[[Context], nn.Module]
OptimLike = torch.optim.Optimizer | Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


def _leaves(tree: Any) -> list[Any]:
    return tree_flatten(tree)[0]


def _named_tensors(tree: Any) -> dict[str, torch.Tensor]:
    """The tensors of a (nested) batch by position: ``{"0": x, "1": y, ...}``."""
    return {str(i): t for i, t in enumerate(_leaves(tree)) if isinstance(t, torch.Tensor)}


def _cast_floating(tree: Any, dtype: torch.dtype, only: torch.dtype | None = None) -> Any:
    """Every floating-point tensor of ``tree`` (of dtype ``only``, when given) cast to ``dtype``."""
    def cast(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype \
                and (only is None or t.dtype == only):
            return t.to(dtype)
        return t
    return tree_map(cast, tree)


def _sharded_to_compute_dtype(model: nn.Module, optimizer: Any, dtype: torch.dtype
                              ) -> tuple[dict[int, torch.Tensor], Any]:
    """Replace every floating ShardedTensor parameter of ``model`` not in ``dtype`` by a copy in ``dtype``.

    Returns ``({id(new param): fp32 local block}, optimizer)``; an optimizer instance has its param
    groups pointed at the new parameters."""
    swap: dict[int, nn.Parameter] = {}
    masters: dict[int, torch.Tensor] = {}
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is None or not isinstance(p, ShardedTensor) or not p.is_floating_point() or p.dtype == dtype:
                continue
            if id(p) not in swap:
                local = p._local.detach()
                q = nn.Parameter(ShardedTensor(local.to(dtype), p.spec, p.mesh, tuple(p.shape)),
                                 requires_grad=p.requires_grad)
                for attr in ("_meshpar_defer_reduce",):
                    if hasattr(p, attr):
                        setattr(q, attr, getattr(p, attr))
                swap[id(p)] = q
                masters[id(q)] = local.float() if local.dtype != torch.float64 else local
            mod._parameters[name] = swap[id(p)]
    if swap and isinstance(optimizer, torch.optim.Optimizer):
        for group in optimizer.param_groups:
            group["params"] = [swap.get(id(p), p) for p in group["params"]]
    return masters, optimizer


@torch.no_grad()
def _load_masters(opt: Any, masters: dict[int, torch.Tensor]) -> None:
    """Write the fp32 values of the converted parameters into the ZeRO wrapper's master buckets."""
    for b in opt.buckets:
        if b.master is b.flat or b.master.dtype == b.flat.dtype:
            continue
        lo, hi = (0, b.padded) if opt.stage == 0 else (b.lo, b.hi)
        for e in b.entries:
            src = masters.get(id(e.param))
            r = e.range_in(lo, hi)
            if src is None or r is None:
                continue
            b.master[r[0] - lo:r[1] - lo].copy_(src.reshape(-1)[r[0] - e.offset:r[1] - e.offset])


def model_plan(ctx: Context | None = None, model: str = "gpt") -> dict | None:
    """The :func:`~meshpar.parallelize` plan of the context's layout for a model of
    :data:`meshpar.models.plans.TABLES` (default meshpar's GPT); None in dense mode.

    The mode is the tensor mode (``"1d"``, ``"2d"``, ``"2.5d"``, ``"3d"``); with ``parallel.sequence.size > 1``
    it is ``"sp"`` (no tensor mode) or ``"1d+sp"`` (tensor mode ``"1d"``). The batch is split over
    ``"data"`` (each data rank's batch is its local block, the batch contract). The sequence-parallel
    attention algorithm (``parallel.sequence.mode``) is set by the engine around each forward.

    Raises:
        ConfigError: a sequence split with a tensor mode other than "1d".
        ShardingError: the model has no table for the mode.
    """
    from ..models.plans import parallel_plan

    ctx = current_context(ctx, what="model_plan()")
    par = ctx.config.parallel
    if par.sequence_size > 1:
        if par.tensor_mode not in (None, "1d"):
            raise ConfigError(f"parallel.sequence > 1 combines with tensor mode '1d' (or none) in the GPT plans, "
                              f"got tensor mode {par.tensor_mode!r}; use tensor=dict(size=N, mode='1d')")
        return parallel_plan(model, "sp" if par.tensor_mode is None else "1d+sp", data=("data",))
    if par.mode == "dense":
        return None
    return parallel_plan(model, par.mode, data=("data",))


def parallelize_model(model: nn.Module, ctx: Context | None = None, plan: dict | None = None) -> nn.Module:
    """Lay ``model`` out for the context (in place; returns it): :func:`~meshpar.parallelize` with
    ``plan`` (default :func:`model_plan`, meshpar's GPT) on the context's mesh, batch axis ``"data"``,
    pipeline axis ``"pipe"``. A dense layout returns the model unchanged."""
    from ..parallel import parallelize

    ctx = current_context(ctx, what="parallelize_model()")
    plan = model_plan(ctx) if plan is None else plan
    if plan is None:
        return model
    mesh = ctx.mesh
    return parallelize(model, mesh, plan, data_axes=("data",),
                       pipe_axes=("pipe",) if "pipe" in mesh.names else ())


class Engine:
    """One training step at a time, with gradient accumulation::

        engine.zero_grad(); loss = engine.criterion(engine(x), y); engine.backward(loss); engine.step()

    With ``gradient_accumulation = n``, ``zero_grad`` and ``step`` act on every n-th call only;
    ``backward`` scales the loss by 1/n and defers the data-parallel reduction to the n-th
    micro-batch. ``step`` returns True when the optimizer actually stepped.
    """

    def __init__(self, model: nn.Module, optimizer: Any, criterion: Callable | None, ctx: Context,
                 lr_scheduler: Any = None, pipeline: PipelineSetup | None = None, *, sharded: bool | None = None,
                 debug: bool = False):
        self.model, self.optimizer, self._criterion, self.ctx = model, optimizer, criterion, ctx
        #: the model has ShardedTensor parameters: batches are placed as ``from_local(x, P("data"))``
        self.sharded = any(hasattr(p, "spec") for p in model.parameters()) if sharded is None else sharded
        #: debug mode: check that batches (and, at initialize, parameters) are equal where their layout says
        self.debug = debug
        self.compute_dtype = _DTYPES[ctx.config.precision]
        self._pipe = pipeline
        self.pipeline = pipeline.pipe if pipeline is not None else None  # a meshpar.pipeline.Pipeline
        self.lr_scheduler = lr_scheduler
        self.accum = ctx.config.gradient_accumulation
        self.micro = 0          # micro-batches seen since the last optimizer step
        self.global_step = 0    # optimizer steps taken
        self.skipped = 0        # steps skipped by fp16 overflow

    # ---------------------------------------------------------------- mode
    def train(self) -> "Engine":
        self.model.train()
        return self

    def eval(self) -> "Engine":
        self.model.eval()
        return self

    @property
    def mesh(self):
        return self.ctx.mesh

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """This rank's parameters by name. With a pipeline: this rank's stages, named as in the whole
        model (e.g. the GPT names; see :mod:`meshpar.train.pipe`), so checkpoints do not depend on the layout."""
        return (self._pipe.named if self._pipe is not None else self.model).named_parameters()

    def model_param_names(self) -> frozenset[str]:
        """Every parameter name of the whole model (with a pipeline, those of all stages)."""
        if self._pipe is not None:
            return self._pipe.all_names
        return frozenset(n for n, _ in self.model.named_parameters())

    def gather_model(self) -> Any:
        """The whole model with the trained weights on every rank (collective): ``engine.model``
        without a pipeline (under ZeRO-3 its parameters are first all-gathered over data, so they
        hold their full values until the next forward frees them); with a pipeline, the model given
        to ``initialize`` (e.g. the GPT) after every stage's parameters were broadcast into it over
        the pipe axis (for sampling or evaluation outside the pipeline)."""
        if self._pipe is not None:
            return self._pipe.gather()
        if getattr(self.optimizer, "stage", 0) == 3:
            from ..optim.gather import gather_all
            gather_all(self.optimizer)
        return self.model

    # ---------------------------------------------------------------- step parts
    def zero_grad(self) -> None:
        if self.micro == 0:
            self.optimizer.zero_grad(set_to_none=True)

    def place(self, batch: Any) -> Any:
        """This data rank's batch as the model sees it (see :mod:`meshpar.train.batch`).

        For a model with ShardedTensor parameters every tensor ``x [b, ...]`` becomes
        ``from_local(x, P("data"), mesh)``, its block of the global batch ``[data * b, ...]``;
        ShardedTensors are taken as is. Plain models (data parallelism) get the plain tensors.
        Under ``precision="bf16"/"fp16"`` floating-point tensors are cast to the compute dtype,
        as autocast would. In debug mode the batch is first checked to be equal on the ranks of one
        data group (all axes but "data"), and ShardedTensors over the axes their spec replicates.
        """
        self._check_batch(batch)
        if self.compute_dtype is not None:
            batch = _cast_floating(batch, self.compute_dtype)
        return B.place_batch(batch, self.mesh) if self.sharded else batch

    def _check_batch(self, batch: Any) -> None:
        """Debug mode: the batch is equal where its layout says (see :meth:`place`)."""
        if self.debug:
            flat = _named_tensors(batch)
            B.check_replicas(flat, self.mesh, what="batch tensor",
                             plain_axes=tuple(a for a in self.mesh.names if a != B.DATA_AXIS),
                             fix="Every rank of one data group (same 'data' coordinate) must get the same batch: "
                                 "use meshpar.train.get_dataloader(dataset, batch_size=global_batch // data).")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.pipeline is not None:
            raise RuntimeError("with parallel.pipeline > 1 a step runs the whole schedule: use "
                               "engine.train_batch((x, y)) (forward and backward of every micro-batch), "
                               "engine.eval_batch((x, y)), or engine.gather_model() for the whole model")
        args, kwargs = self.place((args, kwargs))
        with sequence_parallel(mode=self.ctx.config.parallel.sequence_mode):
            return self.model(*args, **kwargs)

    def criterion(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The criterion of ``(output, labels, ...)``. Plain label tensors next to a ShardedTensor
        output are placed as this data rank's block (``from_local(y, P("data"))``); under bf16/fp16
        the floating inputs are upcast to float32 first, as autocast does for losses."""
        if self._criterion is None:
            raise ValueError("initialize(...) was given no criterion")
        if self.compute_dtype is not None:
            args, kwargs = _cast_floating((args, kwargs), torch.float32, only=self.compute_dtype)
        if any(isinstance(a, ShardedTensor) for a in _leaves((args, kwargs))):
            args, kwargs = B.place_batch((args, kwargs), self.mesh)
        return self._criterion(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of ``loss / gradient_accumulation`` (scaled for fp16); reduces grads on the last micro-batch."""
        self.micro += 1
        last = self.micro >= self.accum
        scaled = loss / self.accum if self.accum > 1 else loss
        if hasattr(self.optimizer, "scale_loss"):
            scaled = self.optimizer.scale_loss(scaled)
        sync = contextlib.nullcontext() if last or not hasattr(self.optimizer, "no_sync") else self.optimizer.no_sync()
        with sync:
            scaled.backward()

    def step(self) -> bool:
        """Optimizer step once ``gradient_accumulation`` micro-batches have been back-propagated."""
        if self.micro < self.accum:
            return False
        self.micro = 0
        stepped = self.optimizer.step()
        stepped = True if stepped is None else bool(stepped)
        if stepped:
            self.global_step += 1
        else:
            self.skipped += 1
        return stepped

    def train_batch(self, batch: Any) -> torch.Tensor:
        """One micro-batch ``(x, y)``: forward, criterion, backward. Returns the (unscaled) loss."""
        x, y = batch
        if self.pipeline is not None:
            self._check_batch((x, y))
            self.micro += 1
            if self.compute_dtype is not None:
                x = _cast_floating(x, self.compute_dtype)
            loss = self.pipeline.step(x, y)  # forward + backward of every micro-batch, loss on every rank
            return loss.detach()
        loss = self.criterion(self(x), y)
        self.backward(loss)
        return loss.detach()

    @torch.no_grad()
    def eval_batch(self, batch: Any) -> torch.Tensor:
        """The loss of ``(x, y)`` without backward (with a pipeline: a forward-only schedule)."""
        x, y = batch
        if self.pipeline is not None:
            if self.compute_dtype is not None:
                x = _cast_floating(x, self.compute_dtype)
            return self.pipeline.evaluate(x, y)
        return self.criterion(self(x), y).detach()

    # ---------------------------------------------------------------- checkpoints
    def state_tensors(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(tensors, extra)`` for :func:`~meshpar.train.checkpoint.save_checkpoint`. Collective."""
        from .state import engine_state
        return engine_state(self)

    def load_state(self, path: str) -> dict[str, Any]:
        """Load a checkpoint folder saved by any layout; returns the extra state. Collective."""
        from .state import load_engine_state
        return load_engine_state(self, path)


def initialize(model: ModelLike, optimizer: OptimLike, criterion: Callable | None = None,
               train_dataloader: Any = None, test_dataloader: Any = None, lr_scheduler: Any = None, *,
               ctx: Context | None = None, debug: bool | None = None) -> tuple[Engine, Any, Any, Any]:
    """Shard, wrap and return ``(engine, train_dataloader, test_dataloader, lr_scheduler)``.

    Args:
        model: an ``nn.Module`` already laid out for ``ctx`` (e.g. ``parallelize_model(GPT(cfg), ctx)``)
            or a factory ``model(ctx) -> nn.Module``. A plain module is used as is for data
            parallelism; with a tensor-parallel mode it must hold ShardedTensor parameters. With
            ``parallel.pipeline > 1``: a block list, or a module with ``pipeline_blocks()`` (the
            GPT), split into stages by :func:`~meshpar.train.pipe.build_pipeline`.
        optimizer: a torch optimizer over the model's parameters, or a factory ``optimizer(params)``.
        lr_scheduler: a scheduler, or a factory ``lr_scheduler(optimizer)`` (built on the wrapped one).
        ctx: the context from :func:`~meshpar.train.launch.launch` (default: the current one, set by
            the last ``launch`` in this process).
        debug: check that parameters (here) and every batch (in the engine) are equal on the ranks
            their layout says hold the same values (a checksum all-gather; see
            :mod:`meshpar.train.batch`). Default: the ``MESHPAR_DEBUG`` environment variable.

    Batches: the engine hands a model with ShardedTensor parameters each data rank's batch as
    ``from_local(x, P("data"))`` (see :mod:`meshpar.train.batch`); with a pipeline, each micro-batch
    is placed so before the first block.
    """
    from ..optim import zero

    ctx = current_context(ctx, what="initialize(...)")
    debug = B.debug_default() if debug is None else bool(debug)
    cfg = ctx.config
    par = cfg.parallel
    if not isinstance(model, nn.Module) and callable(model) and not isinstance(model, (list, tuple)):
        model = model(ctx)
    setup = None
    if par.pipeline > 1:
        setup = build_pipeline(model, criterion, ctx)
        model = setup.pipe
    pipe = setup.pipe if setup is not None else None
    model = model.to(ctx.device)
    sharded = any(isinstance(p, ShardedTensor) for p in model.parameters())
    if par.tensor_mode is not None and par.tensor_size > 1 and not sharded:
        raise ConfigError(f"parallel.tensor mode {par.tensor_mode!r} needs a model with sharded parameters; build "
                          f"it with the plan, e.g. meshpar.train.parallelize_model(GPT(cfg), ctx), or pass a factory "
                          f"model=lambda ctx: ...")
    if par.sequence_size > 1 and not sharded:
        raise ConfigError("parallel.sequence > 1 needs a model whose activations are sharded over 'sp'")
    if debug:
        named = setup.named if setup is not None else model
        B.check_replicas(dict(named.named_parameters()), ctx.mesh, what="parameter", skip_axes=("pipe",),
                         fix="Initialize parameters from a seed that is the same on every rank "
                             "(ctx.seed_for(()), not a per-rank seed) and shard them from one global value.")
    low = _DTYPES[cfg.precision]
    masters: dict[int, torch.Tensor] = {}
    if low is not None and pipe is None:
        # one place says the compute dtype: fp32 ShardedTensor parameters get a low-precision compute
        # copy here (plain ones are cast by the ZeRO wrapper), and their fp32 values become the masters
        masters, optimizer = _sharded_to_compute_dtype(model, optimizer, low)
    if not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer(model.parameters())
    elif pipe is not None:
        raise ConfigError("with parallel.pipeline > 1 pass the optimizer as a factory, e.g. "
                          "optimizer=lambda params: torch.optim.AdamW(params, lr=...): each rank keeps only its stages")
    opt = zero(optimizer, ctx.mesh, stage=cfg.zero_stage, axis="data", module=setup.named if setup else model,
               compute_dtype=_DTYPES[cfg.precision], max_grad_norm=cfg.clip_grad_norm,
               stage_axes=("pipe",) if pipe is not None else (), **cfg.section("zero").get("options", {}))
    if masters:
        _load_masters(opt, masters)
    if pipe is not None:
        pipe.no_sync = opt.no_sync  # the ZeRO wrapper reduces once, after the step's last backward
    if lr_scheduler is not None and callable(lr_scheduler) and not hasattr(lr_scheduler, "step"):
        lr_scheduler = lr_scheduler(opt)
    engine = Engine(model, opt, criterion, ctx, lr_scheduler, pipeline=setup, sharded=sharded, debug=debug)
    seq = f", sequence {par.sequence_size} ({par.sequence_mode})" if par.sequence_size > 1 else ""
    ctx.logger.info(f"initialize: mode {par.mode}{seq}{f', pipeline {par.pipeline} stages' if pipe else ''}, "
                    f"{sum(p.numel() for p in model.parameters()):,} parameters{' in its stages' if pipe else ''} "
                    f"({sum(getattr(p, '_local', p).numel() for p in model.parameters()):,} on this rank), "
                    f"{opt!r}, accumulation {cfg.gradient_accumulation}, clip {cfg.clip_grad_norm}")
    return engine, train_dataloader, test_dataloader, lr_scheduler
