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

from .config import ConfigError
from .launch import Context
from .pipe import PipelineSetup, build_pipeline

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

ModelLike = nn.Module | Callable[[Context], nn.Module]
OptimLike = torch.optim.Optimizer | Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


def make_plan(ctx: Context):
    """The model plan of the context's mode on its mesh (``meshpar.models.plans.make_plan``).

    With ``parallel.sequence.size > 1`` the plan is "sp" (no tensor mode) or "1d+sp" (tensor mode
    "1d"), with ``parallel.sequence.mode`` ("ring" / "all_to_all") as its attention variant.
    """
    from ..models.plans import make_plan as _make_plan

    par = ctx.config.parallel
    if par.sequence_size > 1:
        if par.tensor_mode not in (None, "1d"):
            raise ConfigError(f"parallel.sequence > 1 combines with tensor mode '1d' (or none) in the GPT plans, "
                              f"got tensor mode {par.tensor_mode!r}; use tensor=dict(size=N, mode='1d')")
        mode = "sp" if par.tensor_mode is None else "1d+sp"
        return _make_plan(mode, ctx.mesh, sequence_mode=par.sequence_mode)
    mode = par.mode
    return _make_plan(mode, None if mode == "dense" else ctx.mesh)


class Engine:
    """One training step at a time, with gradient accumulation::

        engine.zero_grad(); loss = engine.criterion(engine(x), y); engine.backward(loss); engine.step()

    With ``gradient_accumulation = n``, ``zero_grad`` and ``step`` act on every n-th call only;
    ``backward`` scales the loss by 1/n and defers the data-parallel reduction to the n-th
    micro-batch. ``step`` returns True when the optimizer actually stepped.
    """

    def __init__(self, model: nn.Module, optimizer: Any, criterion: Callable | None, ctx: Context,
                 lr_scheduler: Any = None, pipeline: PipelineSetup | None = None):
        self.model, self.optimizer, self._criterion, self.ctx = model, optimizer, criterion, ctx
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
        """The whole model with the trained weights on every rank: ``engine.model`` without a pipeline;
        with one, the model given to ``initialize`` (e.g. the GPT) after every stage's parameters
        were broadcast into it over the pipe axis (collective over pipe; for sampling or evaluation
        outside the pipeline)."""
        if self._pipe is None:
            return self.model
        return self._pipe.gather()

    # ---------------------------------------------------------------- step parts
    def zero_grad(self) -> None:
        if self.micro == 0:
            self.optimizer.zero_grad(set_to_none=True)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.pipeline is not None:
            raise RuntimeError("with parallel.pipeline > 1 a step runs the whole schedule: use "
                               "engine.train_batch((x, y)) (forward and backward of every micro-batch), "
                               "engine.eval_batch((x, y)), or engine.gather_model() for the whole model")
        return self.model(*args, **kwargs)

    def criterion(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._criterion is None:
            raise ValueError("initialize(...) was given no criterion")
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
            self.micro += 1
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
               ctx: Context) -> tuple[Engine, Any, Any, Any]:
    """Shard, wrap and return ``(engine, train_dataloader, test_dataloader, lr_scheduler)``.

    Args:
        model: an ``nn.Module`` already laid out for ``ctx`` (e.g. ``GPT(cfg, plan=make_plan(ctx))``)
            or a factory ``model(ctx) -> nn.Module``. A plain module is used as is for data
            parallelism; with a tensor-parallel mode it must hold ShardedTensor parameters. With
            ``parallel.pipeline > 1``: a block list, or a module with ``pipeline_blocks()`` (the
            GPT), split into stages by :func:`~meshpar.train.pipe.build_pipeline`.
        optimizer: a torch optimizer over the model's parameters, or a factory ``optimizer(params)``.
        lr_scheduler: a scheduler, or a factory ``lr_scheduler(optimizer)`` (built on the wrapped one).
        ctx: the context from :func:`~meshpar.train.launch.launch`.
    """
    from ..optim import zero

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
    sharded = any(hasattr(p, "spec") for p in model.parameters())
    if par.tensor_mode is not None and par.tensor_size > 1 and not sharded:
        raise ConfigError(f"parallel.tensor mode {par.tensor_mode!r} needs a model with sharded parameters; build "
                          f"it with the plan, e.g. GPT(cfg, plan=meshpar.train.make_plan(ctx)), or pass a factory "
                          f"model=lambda ctx: ...")
    if par.sequence_size > 1 and not sharded:
        raise ConfigError("parallel.sequence > 1 needs a model whose activations are sharded over 'sp'")
    if not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer(model.parameters())
    elif pipe is not None:
        raise ConfigError("with parallel.pipeline > 1 pass the optimizer as a factory, e.g. "
                          "optimizer=lambda params: torch.optim.AdamW(params, lr=...): each rank keeps only its stages")
    opt = zero(optimizer, ctx.mesh, stage=cfg.zero_stage, axis="data", module=setup.named if setup else model,
               compute_dtype=_DTYPES[cfg.precision], max_grad_norm=cfg.clip_grad_norm,
               stage_axes=("pipe",) if pipe is not None else (), **cfg.section("zero").get("options", {}))
    if pipe is not None:
        pipe.no_sync = opt.no_sync  # the ZeRO wrapper reduces once, after the step's last backward
    if lr_scheduler is not None and callable(lr_scheduler) and not hasattr(lr_scheduler, "step"):
        lr_scheduler = lr_scheduler(opt)
    engine = Engine(model, opt, criterion, ctx, lr_scheduler, pipeline=setup)
    seq = f", sequence {par.sequence_size} ({par.sequence_mode})" if par.sequence_size > 1 else ""
    ctx.logger.info(f"initialize: mode {par.mode}{seq}{f', pipeline {par.pipeline} stages' if pipe else ''}, "
                    f"{sum(p.numel() for p in model.parameters()):,} parameters{' in its stages' if pipe else ''} "
                    f"({sum(getattr(p, '_local', p).numel() for p in model.parameters()):,} on this rank), "
                    f"{opt!r}, accumulation {cfg.gradient_accumulation}, clip {cfg.clip_grad_norm}")
    return engine, train_dataloader, test_dataloader, lr_scheduler
