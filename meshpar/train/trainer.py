"""``Trainer(engine).fit(...)``: the training loop with hooks and a rank-0 progress bar.

The loop counts optimizer steps. One step consumes ``gradient_accumulation`` micro-batches.
The trainer's state (step, epoch, micro-batches consumed in the epoch) goes into checkpoints,
so a resumed run reads the same batches as the uninterrupted one.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import torch

from ..mesh import collectives as C
from .data import ShardedSampler
from .engine import Engine
from .hooks import Hook, LRSchedulerHook, MetricLoggerHook, ThroughputHook


def _plain(loss: torch.Tensor) -> torch.Tensor:
    """A detached plain scalar tensor of ``loss`` (its local value for a replicated ShardedTensor),
    in the loss's dtype, at least float32 (bf16/fp16 losses are upcast)."""
    loss = loss.detach()
    loss = getattr(loss, "_local", loss)
    if loss.dtype in (torch.bfloat16, torch.float16) or not loss.is_floating_point():
        loss = loss.float()
    return loss


class Trainer:
    """Runs an :class:`~meshpar.train.engine.Engine` over a dataloader.

    Args:
        engine: from :func:`~meshpar.train.engine.initialize`.
        hooks: extra hooks; an LR-scheduler, throughput and stdout-logging hook are added when absent.
        step_fn: ``step_fn(engine, batch) -> loss`` for one micro-batch (default ``engine.train_batch``).
        progress: show a tqdm progress bar (rank 0 only).
    """

    def __init__(self, engine: Engine, hooks: Sequence[Hook] = (), step_fn: Callable[[Engine, Any], torch.Tensor]
                 | None = None, progress: bool = True):
        self.engine = engine
        hooks = list(hooks)
        for cls in (LRSchedulerHook, ThroughputHook, MetricLoggerHook):
            if not any(isinstance(h, cls) for h in hooks):
                hooks.append(cls())
        self.hooks = sorted(hooks, key=lambda h: h.priority)
        self.step_fn = step_fn or (lambda eng, batch: eng.train_batch(batch))
        self.progress = progress
        self.step = 0
        self.epoch = 0
        self.consumed = 0  # micro-batches of the current epoch already used
        self.losses: list[float] = []
        self._bar = None

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, st: dict[str, int]) -> None:
        self.step = int(st.get("step", self.engine.global_step))
        self.epoch = int(st.get("epoch", 0))
        self.consumed = int(st.get("consumed", 0))

    def write(self, msg: str) -> None:
        """Print on rank 0 without breaking the progress bar."""
        if self.engine.ctx.rank != 0:
            return
        if self._bar is not None:
            self._bar.write(msg)
        else:
            print(msg, flush=True)

    def _call(self, name: str, *args: Any) -> None:
        for h in self.hooks:
            getattr(h, name)(self, *args)

    # ---------------------------------------------------------------- loop
    def _mean_over_data(self, v: torch.Tensor) -> float:
        """The mean of ``v`` over the data ranks, computed in ``v``'s dtype (float64 stays float64)."""
        mesh = self.engine.mesh
        v = _plain(v).reshape(1)
        return float(C.all_reduce(v, mesh, "data")[0]) / mesh.size("data")

    def fit(self, train_dataloader: Iterable, max_steps: int | None = None, epochs: int | None = None,
            test_dataloader: Iterable | None = None, eval_every: int = 0, eval_batches: int | None = None) -> list[float]:
        """Train until ``max_steps`` optimizer steps (or ``epochs`` epochs). Returns the per-step mean losses."""
        eng = self.engine
        accum = eng.accum
        sampler = getattr(train_dataloader, "sampler", None)
        per_epoch = len(train_dataloader) // accum * accum if hasattr(train_dataloader, "__len__") else None
        if max_steps is None:
            if epochs is None or per_epoch is None:
                raise ValueError("fit needs max_steps, or epochs with a sized dataloader")
            max_steps = epochs * per_epoch // accum
        self._call("before_train")
        eng.train()
        if self.progress and eng.ctx.rank == 0:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        try:
            while self.step < max_steps:
                if isinstance(sampler, ShardedSampler):
                    sampler.set_epoch(self.epoch)
                    if self.consumed:
                        sampler.load_state_dict({"epoch": self.epoch, "consumed": self.consumed * sampler.batch_size})
                elif self.consumed:
                    raise RuntimeError("cannot resume mid-epoch: the dataloader's sampler is not a ShardedSampler "
                                       "(use meshpar.train.get_dataloader)")
                done = self._epoch(train_dataloader, max_steps, per_epoch, test_dataloader, eval_every, eval_batches)
                if done:
                    break
                self.epoch += 1
                self.consumed = 0
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
        self._call("after_train")
        return self.losses

    def _epoch(self, dl, max_steps, per_epoch, test_dl, eval_every, eval_batches) -> bool:
        eng = self.engine
        acc_loss, tokens = None, 0
        for batch in dl:
            if per_epoch is not None and self.consumed >= per_epoch:
                break  # a ragged tail shorter than one accumulation window
            eng.zero_grad()
            loss = self.step_fn(eng, batch)
            loss = _plain(loss)
            acc_loss = loss if acc_loss is None else acc_loss + loss
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            tokens += x.numel() if isinstance(x, torch.Tensor) else 0
            self.consumed += 1
            if not eng.step():
                continue
            self.step += 1
            mean = self._mean_over_data(acc_loss / eng.accum)
            if not math.isfinite(mean):
                raise FloatingPointError(f"loss is {mean} at step {self.step}")
            self.losses.append(mean)
            metrics: dict[str, Any] = {"loss": mean, "tokens": tokens * eng.mesh.size("data")}
            acc_loss, tokens = None, 0
            self._call("after_step", metrics)
            if self._bar is not None:
                self._bar.update(1)
                self._bar.set_postfix(loss=f"{mean:.4f}")
            if eval_every and test_dl is not None and self.step % eval_every == 0:
                self.evaluate(test_dl, eval_batches)
            if self.step >= max_steps:
                return True
        return False

    @torch.no_grad()
    def evaluate(self, dl: Iterable, max_batches: int | None = None) -> float:
        """Mean loss over ``dl`` (averaged over data ranks); calls the ``after_eval`` hooks."""
        eng = self.engine
        was_training = eng.model.training
        eng.eval()
        total, n = None, 0
        for i, batch in enumerate(dl):
            if max_batches is not None and i >= max_batches:
                break
            v = _plain(eng.eval_batch(batch))
            total = v if total is None else total + v
            n += 1
        if was_training:
            eng.train()
        if total is None:
            raise ValueError("evaluate: the dataloader gave no batch")
        mean = self._mean_over_data(total / n)
        self._call("after_eval", {"loss": mean})
        return mean
