"""Trainer hooks: lr schedule, throughput (tokens/s, MFU), metric logging, checkpointing.

A hook overrides any of ``before_train(trainer)``, ``after_step(trainer, metrics)``,
``after_eval(trainer, metrics)``, ``after_train(trainer)``. ``metrics`` is a dict the hooks
may add to; hooks run in ascending ``priority``.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import export_safetensors, latest_checkpoint, save_checkpoint

if TYPE_CHECKING:
    from .trainer import Trainer

#: dense bf16 peak FLOP/s per device, by name fragment (for MFU)
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}


class Hook:
    """Base hook: every method is a no-op."""

    priority: int = 50

    def before_train(self, trainer: "Trainer") -> None: ...

    def after_step(self, trainer: "Trainer", metrics: dict[str, Any]) -> None: ...

    def after_eval(self, trainer: "Trainer", metrics: dict[str, Any]) -> None: ...

    def after_train(self, trainer: "Trainer") -> None: ...


class LRSchedulerHook(Hook):
    """Steps ``engine.lr_scheduler`` after every optimizer step and records ``lr``."""

    priority = 10

    def after_step(self, trainer, metrics):
        sched = trainer.engine.lr_scheduler
        if sched is not None:
            sched.step()
        metrics["lr"] = trainer.engine.optimizer.param_groups[0]["lr"]


def default_peak_flops() -> float | None:
    """Peak dense bf16 FLOP/s of this process's GPU, or None (CPU / unknown)."""
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


class ThroughputHook(Hook):
    """``tokens_per_s`` (global) and ``mfu`` = flops_per_token x tokens/s / (peak x world size).

    Args:
        flops_per_token: model FLOPs per trained token (e.g. 6N + 12 L T C); None skips MFU.
        peak_flops: per-device peak; default from the GPU name (None on CPU).
    """

    priority = 20

    def __init__(self, flops_per_token: float | None = None, peak_flops: float | None = None):
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops if peak_flops is not None else default_peak_flops()
        self._t = None

    def before_train(self, trainer):
        self._t = time.perf_counter()

    def after_step(self, trainer, metrics):
        now = time.perf_counter()
        dt, self._t = now - self._t, now
        tokens = metrics.get("tokens", 0)
        metrics["step_time_s"] = dt
        metrics["tokens_per_s"] = tokens / dt if dt > 0 else 0.0
        if self.flops_per_token and self.peak_flops:
            metrics["mfu"] = self.flops_per_token * metrics["tokens_per_s"] / (self.peak_flops * trainer.engine.ctx.world_size)


class MetricLoggerHook(Hook):
    """Rank 0 logs metrics every ``every`` steps to stdout, a JSONL file and TensorBoard (when installed).

    The JSONL file holds the whole run, across restarts: a fresh run truncates it, a resumed run
    keeps the rows up to the step it resumed from."""

    priority = 90

    def __init__(self, every: int = 10, jsonl: str | os.PathLike | None = None, tensorboard: str | None = None,
                 stdout: bool = True):
        self.every, self.stdout = every, stdout
        self.jsonl = Path(jsonl) if jsonl else None
        self.tb_dir = tensorboard
        self._tb = None
        self.history: list[dict[str, Any]] = []

    def before_train(self, trainer):
        if trainer.engine.ctx.rank != 0:
            return
        if self.jsonl:
            self.jsonl.parent.mkdir(parents=True, exist_ok=True)
            self._trim(trainer.step)
        if self.tb_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(self.tb_dir)
            except ImportError:
                trainer.engine.ctx.logger.info("tensorboard is not installed: TensorBoard logging is off")

    def _trim(self, step: int) -> None:
        """A fresh run (step 0) starts a new file; a resumed one drops rows logged after its checkpoint."""
        if not self.jsonl.exists():
            return
        keep = []
        if step > 0:
            for line in self.jsonl.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= step:
                        keep.append(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a killed process
        self.jsonl.write_text("".join(k + "\n" for k in keep))

    def _record(self, trainer, metrics, kind: str) -> None:
        if trainer.engine.ctx.rank != 0:
            return
        row = {"kind": kind, "step": trainer.step, **{k: v for k, v in metrics.items() if _scalar(v)}}
        self.history.append(row)
        if self.jsonl:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("kind", "step"):
                    self._tb.add_scalar(f"{kind}/{k}", v, trainer.step)
        if self.stdout and (kind == "eval" or trainer.step % self.every == 0 or trainer.step == 1):
            parts = " ".join(f"{k} {_fmt(v)}" for k, v in row.items() if k not in ("kind", "step"))
            trainer.write(f"{kind} step {trainer.step}: {parts}")

    def after_step(self, trainer, metrics):
        self._record(trainer, metrics, "train")

    def after_eval(self, trainer, metrics):
        self._record(trainer, metrics, "eval")

    def after_train(self, trainer):
        if self._tb is not None:
            self._tb.close()


def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fmt(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class CheckpointHook(Hook):
    """Saves every ``every`` steps and at the end; resumes from the latest checkpoint when asked.

    Args:
        directory: checkpoint root (``step_XXXXXXXX`` folders and a ``latest`` pointer).
        every: steps between saves (0: only at the end).
        resume: load the latest checkpoint (if any) before training.
        keep: complete checkpoints kept.
        export: a safetensors file to write the final full weights to.
    """

    priority = 80

    def __init__(self, directory: str | os.PathLike, every: int = 100, resume: bool = True, keep: int = 2,
                 export: str | os.PathLike | None = None):
        self.dir, self.every, self.resume, self.keep, self.export = Path(directory), every, resume, keep, export
        self.resumed_from: int | None = None
        self._last_saved: int | None = None

    def before_train(self, trainer):
        if not self.resume:
            return
        path = latest_checkpoint(self.dir)
        if path is None:
            return
        extra = trainer.engine.load_state(str(path))
        trainer.load_state_dict(extra.get("trainer", {}))
        self.resumed_from = trainer.step
        trainer.engine.ctx.logger.info(f"resumed from {path} at step {trainer.step}")

    def save(self, trainer) -> Path:
        tensors, extra = trainer.engine.state_tensors()
        extra["trainer"] = trainer.state_dict()
        path = save_checkpoint(self.dir, trainer.step, tensors, extra, keep=self.keep, mesh=trainer.engine.mesh)
        self._last_saved = trainer.step
        return path

    def after_step(self, trainer, metrics):
        if self.every and trainer.step % self.every == 0:
            self.save(trainer)

    def after_train(self, trainer):
        if self._last_saved != trainer.step:
            self.save(trainer)
        if self.export:
            export_safetensors(latest_checkpoint(self.dir), self.export, mesh=trainer.engine.mesh)
