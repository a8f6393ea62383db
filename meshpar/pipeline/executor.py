"""Running a training step over micro-batches on the ``pipe`` axis of a mesh.

::

    pipe = Pipeline(blocks, mesh, loss_fn, schedule="1f1b", num_microbatches=8)
    opt = torch.optim.AdamW(pipe.parameters())
    for x, y in data:                       # the same batch on every rank (see below)
        opt.zero_grad()
        loss = pipe.step(x, y)              # mean micro-batch loss, on every pipe rank
        opt.step()

Shapes: ``inputs`` is ``[batch, ...]`` and is split into ``num_microbatches`` equal slices along
dim 0 (``batch`` must be divisible); ``targets`` likewise. Only the first stage reads ``inputs``
and only the last reads ``targets``, but passing the batch on every pipe rank lets every rank
check it, so a bad batch raises everywhere before any send, and a batch of a new shape (a short
last batch) makes every rank renegotiate the cached activation shapes. ``None`` is allowed on
ranks that do not read it; then the shapes must stay fixed (or call :meth:`reset_shapes` on
every rank).

Loss: ``loss_fn(output_mb, target_mb)`` must return a scalar; the step backpropagates
``loss_mb / num_microbatches`` and returns the mean over micro-batches as a 0-dim float tensor on
**every** pipe rank (one tiny broadcast from the last stage at the end of the step; pass
``loss_on="last"`` to skip it, other ranks then get ``None``). Over a ``data`` axis each data
replica returns the loss of its own shard of the global batch.

Gradients accumulate into ``.grad`` (zero them before a step, as with DDP). With a data axis the
gradients of each chunk are all-reduced over it (mean by default, ``grad_reduce="sum"`` for a sum)
asynchronously as soon as that chunk's last backward has run; the step waits for them before
returning.

Evaluation: ``pipe.evaluate(x, y)`` runs the forward of every micro-batch only (a forward-only
table, no autograd) and returns the mean loss the same way. After training,
``pipe.gather_blocks(blocks)`` copies every stage's parameters over the pipe axis into the full
block list on every rank, so the un-pipelined model can be used (sampling, export).
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch
import torch.nn as nn

from ..errors import ShardingError
from ..mesh import collectives as C
from ..mesh.mesh import Mesh, current_mesh, normalize_axes
from ..sharding import unshard
from . import p2p
from .blocks import as_module, build_chunk
from .partition import partition as make_partition
from .schedules import (B, F, RECV_B, RECV_F, SEND_B, SEND_F, Action, Schedule, check_params,
                        make_forward_schedule, make_schedule)


class _Mailbox:
    """A receive from another chunk of the same rank: the value is taken when waited for."""

    def __init__(self, box: dict, key: tuple):
        self._box, self._key = box, key

    def wait(self) -> torch.Tensor:
        return self._box.pop(self._key)


class Pipeline(nn.Module):
    """This rank's chunks of a block-sequential model and the schedule that runs them.

    Args:
        blocks: the model as a sequence of blocks: ``nn.Module`` s, functions ``fn(x)``, or pairs
            ``(fn, params)`` for ``fn(params, x)``. Every rank passes the same list (only its own
            chunks are kept). Each block maps one tensor to one tensor.
        mesh: a mesh with the ``pipe_axis``; defaults to the ``with mesh:`` mesh.
        loss_fn: ``loss_fn(output, target) -> scalar`` applied on the last stage per micro-batch.
        schedule: ``"gpipe"``, ``"1f1b"`` or ``"interleaved"``.
        num_microbatches: micro-batches per step (``interleaved``: a multiple of the pipe size).
        chunks: virtual stages per rank (``interleaved``: >= 2; ``gpipe``: any; ``1f1b``: 1).
        partition: ``"uniform"``, ``"parameters"`` or ``pipe_size * chunks - 1`` cut indices.
        pipe_axis: name of the pipeline axis.
        data_axes: axes to all-reduce gradients over after the last backward; default ``"data"``
            when the mesh has it. Tensor-parallel axes are left to the layers.
        grad_reduce: ``"mean"`` or ``"sum"`` over ``data_axes``.
        loss_on: ``"all"`` (broadcast over pipe) or ``"last"``.
        record_timing: keep per-action compute times of the last step in :attr:`stats`.
        no_sync: for a gradient-reducing optimizer wrapper (meshpar ZeRO, DDP) instead of
            ``data_axes``: a context-manager factory (``opt.no_sync``) under which every backward
            of the step but this rank's last runs, so the wrapper reduces once per step.
    """

    def __init__(self, blocks: Sequence[object], mesh: Mesh | None = None,
                 loss_fn: Callable[..., torch.Tensor] | None = None, *, schedule: str = "1f1b",
                 num_microbatches: int = 1, chunks: int = 1, partition: str | Sequence[int] = "uniform",
                 pipe_axis: str = "pipe", data_axes: str | Sequence[str] | None | object = ...,
                 grad_reduce: str = "mean", loss_on: str = "all", record_timing: bool = False,
                 no_sync: Callable[[], ContextManager[Any]] | None = None):
        super().__init__()
        mesh = current_mesh(mesh)
        if pipe_axis not in mesh.names:
            raise ShardingError(
                f"mesh {mesh} has no pipeline axis {pipe_axis!r}; build the mesh with a {pipe_axis!r} axis, "
                f"e.g. Mesh((4, 2), ('{pipe_axis}', 'data')), or pass pipe_axis= one of {mesh.names}")
        if loss_fn is None:
            raise ShardingError("Pipeline needs loss_fn(output, target) -> scalar for the last stage")
        if grad_reduce not in ("mean", "sum"):
            raise ShardingError(f"grad_reduce must be 'mean' or 'sum', got {grad_reduce!r}")
        if loss_on not in ("all", "last"):
            raise ShardingError(f"loss_on must be 'all' or 'last', got {loss_on!r}")
        self.mesh, self.pipe_axis = mesh, pipe_axis
        self.pipe_size, self.pipe_rank = mesh.size(pipe_axis), mesh.coord(pipe_axis)
        check_params(schedule, self.pipe_size, num_microbatches, chunks)
        blocks = list(blocks)
        self.ranges = make_partition(blocks, self.pipe_size * chunks, partition)
        if data_axes is ...:
            data_axes = ("data",) if "data" in mesh.names else ()
        self.data_axes = mesh.check_axes(normalize_axes(data_axes)) if data_axes else ()
        if pipe_axis in self.data_axes:
            raise ShardingError(f"data_axes {self.data_axes} must not contain the pipe axis {pipe_axis!r}")
        self.schedule: Schedule = make_schedule(schedule, self.pipe_size, num_microbatches, chunks)
        self._forward_actions = make_forward_schedule(self.pipe_size, num_microbatches, chunks).actions(self.pipe_rank)
        self.num_microbatches, self.chunks = num_microbatches, chunks
        self.loss_fn, self.grad_reduce, self.loss_on = loss_fn, grad_reduce, loss_on
        self.record_timing = record_timing
        self.stats: dict[str, Any] = {}
        self.stages = nn.ModuleList(build_chunk(blocks, *self.ranges[self.virtual_stage(c)])
                                    for c in range(chunks))
        self._recv_meta: dict[int, p2p.TensorMeta] = {}   # chunk -> meta of its input activation
        self._sent_meta: dict[int, p2p.TensorMeta] = {}   # chunk -> meta of its output activation
        self._input_sig: tuple | None = None               # (shape, dtype) of input micro-batch 0
        self._actions = self.schedule.actions(self.pipe_rank)
        self._last_backward = {a.chunk: i for i, a in enumerate(self._actions) if a.kind == B}
        self._final_backward = max(self._last_backward.values())
        if no_sync is not None and self.data_axes:
            raise ShardingError(
                f"no_sync= hands gradient reduction to an optimizer wrapper, but data_axes={self.data_axes} "
                "would reduce them again; pass data_axes=None with no_sync=")
        self.no_sync = no_sync

    # ------------------------------------------------------------------ topology
    def virtual_stage(self, chunk: int) -> int:
        """Global index of this rank's ``chunk`` (stage ``chunk * pipe_size + pipe_rank``)."""
        return chunk * self.pipe_size + self.pipe_rank

    @property
    def num_stages(self) -> int:
        return self.pipe_size * self.chunks

    def is_first(self, chunk: int) -> bool:
        return self.virtual_stage(chunk) == 0

    def is_last(self, chunk: int) -> bool:
        return self.virtual_stage(chunk) == self.num_stages - 1

    def block_indices(self, chunk: int) -> range:
        """Indices (in the full block list) of the blocks of this rank's ``chunk``."""
        return range(*self.ranges[self.virtual_stage(chunk)])

    def named_block_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``("<global block index>.<name>", param)`` for this rank's parameters, as in ``nn.Sequential(*blocks)``."""
        for c, stage in enumerate(self.stages):
            for local_i, global_i in enumerate(self.block_indices(c)):
                for name, prm in stage[local_i].named_parameters():
                    yield f"{global_i}.{name}", prm

    def reset_shapes(self) -> None:
        """Forget cached activation shapes (call on every pipe rank together when they change)."""
        self._recv_meta.clear()
        self._sent_meta.clear()

    @torch.no_grad()
    def gather_blocks(self, blocks: Sequence[object]) -> None:
        """Copy every block's parameters from the pipe rank that holds it into ``blocks``, on every pipe rank.

        ``blocks`` is the full block list (the one given at construction, or ``nn.Module`` s with the
        same parameters in the same order, e.g. a second ``GPT.pipeline_blocks()``); afterwards
        ``nn.Sequential(*blocks)`` holds the trained weights on every rank, for sampling, evaluation
        without the pipeline, or export. Each block's parameters (their local blocks, so
        tensor-parallel parameters stay sharded, in float64 so every dtype arrives exactly) are
        broadcast over the pipe axis from their owner as one flat message. Collective over the
        pipe axis (every pipe rank calls it with the same list).
        """
        n = self.ranges[-1][1]
        if len(blocks) != n:
            raise ShardingError(f"gather_blocks needs the full list of {n} blocks, got {len(blocks)}")
        mesh, me = self.mesh, self.pipe_rank
        for s, (lo, hi) in enumerate(self.ranges):
            owner, chunk = s % self.pipe_size, s // self.pipe_size
            for i in range(lo, hi):
                if isinstance(blocks[i], tuple):
                    raise ShardingError(f"gather_blocks: block {i} is a (fn, params) pair; give nn.Module blocks "
                                        "(e.g. meshpar.pipeline.FunctionalBlock(fn, params)) to receive parameters")
                dst = [p2p.local_block(p) for p in as_module(blocks[i], i).parameters()]
                if not dst:
                    continue
                if owner == me:
                    src = [p2p.local_block(p) for p in self.stages[chunk][i - lo].parameters()]
                    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in src])
                else:
                    flat = torch.empty(sum(t.numel() for t in dst), dtype=torch.float64, device=mesh.device)
                if self.pipe_size > 1:
                    flat = C.broadcast(flat, mesh, self.pipe_axis, src=owner, out=flat)
                off = 0
                for t in dst:
                    t.copy_(flat[off:off + t.numel()].view_as(t))
                    off += t.numel()

    def forward(self, *args, **kwargs):  # pragma: no cover - guidance only
        raise ShardingError("call Pipeline.step(inputs, targets) to run a pipelined training step")

    # ------------------------------------------------------------------ checks
    def _split(self, x: Any, what: str) -> list[Any] | None:
        if x is None:
            return None
        m = self.num_microbatches
        if not isinstance(x, torch.Tensor) or x.ndim == 0:
            raise ShardingError(f"pipeline {what} must be a tensor with a batch dimension 0, got {type(x).__name__}")
        if x.shape[0] % m:
            raise ShardingError(
                f"pipeline {what} has batch size {x.shape[0]} (dim 0), not divisible by num_microbatches={m}; "
                f"use a batch size that is a multiple of {m} or change num_microbatches")
        x = x.to(self.mesh.device, non_blocking=True)
        return list(x.chunk(m, dim=0)) if m > 1 else [x]

    # ------------------------------------------------------------------ step
    def step(self, inputs: torch.Tensor | None, targets: torch.Tensor | None = None) -> torch.Tensor | None:
        """Run forward and backward of every micro-batch with the schedule; see the module docstring."""
        return self._run(inputs, targets, train=True)

    @torch.no_grad()
    def evaluate(self, inputs: torch.Tensor | None, targets: torch.Tensor | None = None) -> torch.Tensor | None:
        """The mean micro-batch loss of ``(inputs, targets)`` without backward (forward-only table,
        no autograd graph, no gradient messages). Inputs, targets and the returned loss are as in
        :meth:`step`; the modules' train/eval mode is the caller's (``pipe.eval()``)."""
        return self._run(inputs, targets, train=False)

    def _run(self, inputs: torch.Tensor | None, targets: torch.Tensor | None, *, train: bool) -> torch.Tensor | None:
        mesh, axis, m = self.mesh, self.pipe_axis, self.num_microbatches
        xs = self._split(inputs, "inputs")
        ys = self._split(targets, "targets")
        if any(self.is_first(c) for c in range(self.chunks)) and xs is None:
            raise ShardingError(f"pipe rank {self.pipe_rank} runs the first stage and needs inputs, got None")
        if xs is not None:  # a new micro-batch shape renegotiates (on every rank that sees the batch)
            sig = (tuple(xs[0].shape), xs[0].dtype)
            if self._input_sig is not None and sig != self._input_sig:
                self.reset_shapes()
            self._input_sig = sig
        if any(c not in self._recv_meta for c in range(self.chunks) if not self.is_first(c)) or \
                any(c not in self._sent_meta for c in range(self.chunks) if not self.is_last(c)):
            self._exchange_shapes(xs)

        t_step = time.perf_counter()
        timings: list[tuple[Action, float]] = []
        pending_recv: dict[tuple[str, int, int], Any] = {}
        sends: list[Any] = []                           # gradient sends, waited for at the end
        act_sends: dict[tuple[int, int], Any] = {}      # activation sends by (mb, chunk)
        saved_in: dict[tuple[int, int], torch.Tensor] = {}
        saved_out: dict[tuple[int, int], torch.Tensor] = {}
        losses: list[torch.Tensor] = []
        grad_work: list[tuple[list[torch.Tensor], Any]] = []

        def post_recv(a: Action) -> None:
            key = (a.kind, a.mb, a.chunk)
            if a.peer == self.pipe_rank:  # a link between two chunks of this rank: no communication
                pending_recv[key] = _Mailbox(mailbox, key)
                return
            # an activation has the cached shape of its link; a gradient that of the activation sent
            meta = self._recv_meta[a.chunk] if a.kind == RECV_F else self._sent_meta[a.chunk]
            buf = torch.empty(meta.local_shape, dtype=meta.dtype, device=mesh.device)
            pending_recv[key] = p2p.recv_async(buf, mesh, axis, a.peer)

        def take_recv(kind: str, mb: int, chunk: int) -> torch.Tensor:
            return pending_recv.pop((kind, mb, chunk)).wait()

        mailbox: dict[tuple[str, int, int], torch.Tensor] = {}

        def send(a: Action, t: torch.Tensor) -> None:
            if a.peer != self.pipe_rank:
                work = p2p.send_async(t, mesh, axis, a.peer)
                if a.kind == SEND_F:  # released at this (mb, chunk)'s backward, see below
                    act_sends[(a.mb, a.chunk)] = work
                else:
                    sends.append(work)
                return
            s = self.virtual_stage(a.chunk) + (1 if a.kind == SEND_F else -1)
            mailbox[(RECV_F if a.kind == SEND_F else RECV_B, a.mb, s // self.pipe_size)] = t.detach().clone()

        for i, a in enumerate(self._actions if train else self._forward_actions):
            if a.kind in (RECV_F, RECV_B):
                post_recv(a)
            elif a.kind == F:
                t0 = self._tic()
                stage = self.stages[a.chunk]
                if self.is_first(a.chunk):
                    x = xs[a.mb]
                    leaf = None
                else:
                    leaf = take_recv(RECV_F, a.mb, a.chunk).requires_grad_(train)
                    x = p2p.wrap_received(leaf, self._recv_meta[a.chunk], mesh)
                y = stage(x)
                if self.is_last(a.chunk):
                    loss = self.loss_fn(y, ys[a.mb] if ys is not None else None)
                    loss = self._scalar(loss)
                    losses.append(loss.detach())
                    if train:
                        saved_out[(a.mb, a.chunk)] = loss / m
                else:
                    saved_out[(a.mb, a.chunk)] = y
                if train:
                    saved_in[(a.mb, a.chunk)] = leaf
                timings.append((a, self._toc(t0)))
            elif a.kind == SEND_F:
                y = saved_out[(a.mb, a.chunk)]
                meta, known = p2p.meta_of(y), self._sent_meta[a.chunk]
                if known != meta:
                    raise ShardingError(
                        f"pipe rank {self.pipe_rank} chunk {a.chunk}: activation changed from {known} to {meta} "
                        "since the first step; keep micro-batch shapes fixed or call reset_shapes() on every rank")
                send(a, p2p.local_block(y))
                if not train:  # no backward will need it
                    del saved_out[(a.mb, a.chunk)]
            elif a.kind == B:
                t0 = self._tic()
                out = saved_out.pop((a.mb, a.chunk))
                sync = self.no_sync is None or i == self._final_backward
                with contextlib.nullcontext() if sync else self.no_sync():
                    if self.is_last(a.chunk):
                        out.backward()
                    else:
                        g = take_recv(RECV_B, a.mb, a.chunk)
                        # its gradient arrived, so the peer has the activation: free the send buffer
                        work = act_sends.pop((a.mb, a.chunk), None)
                        if work is not None:
                            work.wait()
                        torch.autograd.backward(p2p.autograd_local(out), g)
                leaf = saved_in.pop((a.mb, a.chunk))
                if leaf is not None:
                    saved_in[("grad", a.mb, a.chunk)] = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
                if self.data_axes and self._last_backward[a.chunk] == i:
                    grad_work.append(self._reduce_grads_async(self.stages[a.chunk]))
                timings.append((a, self._toc(t0)))
            elif a.kind == SEND_B:
                g = saved_in.pop(("grad", a.mb, a.chunk))
                send(a, g)
        for work in sends + list(act_sends.values()):
            work.wait()
        for grads, work in grad_work:
            self._finish_grads(grads, work)
        if saved_out or pending_recv:
            raise RuntimeError("pipeline step finished with unconsumed activations or messages (schedule bug)")
        loss = torch.stack(losses).mean() if losses else None
        if self.loss_on == "all" and self.pipe_size > 1:
            buf = loss.to(torch.float64) if loss is not None else torch.empty((), dtype=torch.float64, device=mesh.device)
            loss = C.broadcast(buf, mesh, axis, src=(self.num_stages - 1) % self.pipe_size, out=buf)
        if self.record_timing and train:
            self._sync()
            self.stats = {"step_s": time.perf_counter() - t_step,
                          "compute_s": sum(self._elapsed(t) for _, t in timings),
                          "actions": [(repr(a), self._elapsed(t)) for a, t in timings]}
        return loss

    # ------------------------------------------------------------------ helpers
    def _exchange_shapes(self, xs: list[torch.Tensor] | None) -> None:
        """Learn every link's activation shape/dtype/spec once, before the first step.

        Micro-batch 0 runs forward stage by stage along the chain of virtual stages, without
        autograd and with the RNG state restored afterwards; each stage sends the metadata of
        its output (not the values) to the next. Later steps reuse the cached metadata. The
        chain is one message per link in stage order, safe on gloo and NCCL alike.
        """
        mesh, axis = self.mesh, self.pipe_axis
        devices = [mesh.device] if mesh.device.type == "cuda" else []
        me = self.pipe_rank
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            for c in range(self.chunks):
                s = self.virtual_stage(c)
                if self.is_first(c):
                    x = xs[0]
                else:
                    src = (s - 1) % self.pipe_size
                    meta = self._sent_meta[c - 1] if src == me else p2p.recv_meta(mesh, axis, src)
                    self._recv_meta[c] = meta
                    x = p2p.wrap_received(torch.zeros(meta.local_shape, dtype=meta.dtype, device=mesh.device),
                                          meta, mesh)
                if self.is_last(c):
                    continue
                meta = p2p.meta_of(self.stages[c](x))
                self._sent_meta[c] = meta
                if (s + 1) % self.pipe_size != me:  # one rank, several chunks: handed over locally
                    p2p.send_meta(meta, mesh, axis, (s + 1) % self.pipe_size).wait()

    def _scalar(self, loss: torch.Tensor) -> torch.Tensor:
        if p2p.is_sharded(loss):
            loss = unshard(loss)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ShardingError(f"loss_fn must return a scalar tensor, got {getattr(loss, 'shape', type(loss))}")
        return loss.reshape(())

    def _reduce_grads_async(self, stage: nn.Module) -> tuple[list[torch.Tensor], Any]:
        grads = []
        for prm in stage.parameters():
            if not prm.requires_grad:
                continue
            if prm.grad is None:
                prm.grad = torch.zeros_like(prm)
            grads.append(p2p.local_block(prm.grad) if p2p.is_sharded(prm.grad) else prm.grad)
        if not grads:
            return grads, None
        flat = torch.cat([g.reshape(-1) for g in grads])
        return grads, C.all_reduce(flat, self.mesh, self.data_axes, async_op=True)

    def _finish_grads(self, grads: list[torch.Tensor], work: Any) -> None:
        if work is None:
            return
        flat = work.wait()
        if self.grad_reduce == "mean":
            flat = flat / self.mesh.size(self.data_axes)
        off = 0
        with torch.no_grad():
            for g in grads:
                n = g.numel()
                g.copy_(flat[off:off + n].view_as(g))
                off += n

    def _tic(self):
        if not self.record_timing:
            return None
        if self.mesh.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _toc(self, t0):
        if t0 is None:
            return None
        if isinstance(t0, float):
            return time.perf_counter() - t0
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return (t0, ev)

    @staticmethod
    def _elapsed(t) -> float:
        if t is None:
            return 0.0
        if isinstance(t, float):
            return t
        return t[0].elapsed_time(t[1]) / 1e3

    def _sync(self) -> None:
        if self.mesh.device.type == "cuda":
            torch.cuda.synchronize()
