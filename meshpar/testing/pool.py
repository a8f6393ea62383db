"""A persistent pool of gloo worker processes for testing sharded code on CPU.

Starting torch processes and a gloo world costs seconds, so a test session starts the pool
once and runs many small functions on it::

    pool = WorkerPool(world_size=8)
    results = pool.run(check_fn, (2, 2), ("x", "y"), arg1, arg2)   # check_fn(mesh, arg1, arg2)

``check_fn`` must be a module-level function (it is pickled by reference). Every worker of the
world takes part in building the mesh (that is collective); the ranks inside the mesh then call
``check_fn(mesh, *args)``. The list of their results (mesh-rank order) comes back. An exception
on any rank is re-raised here with that rank's traceback. A rank that does not answer within
``timeout_s`` makes the pool restart and raises :class:`TimeoutError`, so a broken test never hangs
the session.
"""
from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from typing import Any, Callable, Sequence

import torch
import torch.multiprocessing as mp
from multiprocessing.reduction import ForkingPickler


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, tasks, results, mesh_timeout_s: float) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    import datetime

    import torch.distributed as dist

    from meshpar.mesh import Mesh

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=mesh_timeout_s))
    results.put((0, rank, True, "ready"))
    meshes: dict[tuple, Mesh] = {}
    while True:
        task = tasks.get()
        if task is None:
            break
        tid, fn, shape, names, args, kwargs = task
        try:
            if shape is None:
                out = fn(rank, world, *args, **kwargs)
            else:
                key = (tuple(shape), tuple(names))
                if key not in meshes:
                    meshes[key] = Mesh(shape, names, timeout_s=mesh_timeout_s)
                mesh = meshes[key]
                # each task sees a mesh as if new: no shared random stream left by an earlier task's
                # meshpar.manual_seed (found: test_nn's F.dropout seed check failed after test_semantics)
                vars(mesh).pop("_rng_state", None)
                out = fn(mesh, *args, **kwargs) if mesh.contains_me else None
            # a result the queue cannot send (a function defined in a test, a tensor in an autograd graph)
            # fails in the queue's feeder thread, out of reach: check here, so the parent gets the error
            # at once instead of waiting out its timeout
            ForkingPickler.dumps(out)
            results.put((tid, rank, True, out))
        except BaseException as e:  # noqa: BLE001 - report everything to the parent
            results.put((tid, rank, False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    # leave at once: a graceful process-group teardown (and atexit hooks that tests registered, e.g. a
    # launch's teardown barrier) would wait on ranks that are leaving too
    results.close()
    results.join_thread()
    os._exit(0)


class WorkerError(AssertionError):
    """A function raised on a worker rank; the message holds that rank's traceback."""


class WorkerPool:
    """``world_size`` gloo processes kept alive across many :meth:`run` calls."""

    def __init__(self, world_size: int = 8, timeout_s: float = 180.0, mesh_timeout_s: float = 60.0,
                 startup_timeout_s: float = 900.0):
        self.startup_timeout_s = startup_timeout_s
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.mesh_timeout_s = mesh_timeout_s
        self._procs: list = []
        self._tid = 0
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = _free_port()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._results = ctx.Queue()
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        self._procs = [ctx.Process(target=_worker, args=(r, self.world_size, port, self._tasks[r], self._results,
                                                         self.mesh_timeout_s), daemon=True)
                       for r in range(self.world_size)]
        for p in self._procs:
            p.start()
        self._ready = False

    def _wait_ready(self) -> None:
        """Start-up (imports, gloo rendezvous) gets its own allowance, apart from each run's timeout."""
        seen: set[int] = set()
        deadline = time.monotonic() + self.startup_timeout_s
        while len(seen) < self.world_size:
            if time.monotonic() > deadline or any(not p.is_alive() for p in self._procs):
                raise TimeoutError(f"worker pool did not start: ranks {sorted(set(range(self.world_size)) - seen)} "
                                   f"not ready after {self.startup_timeout_s}s")
            try:
                t, rank, ok, out = self._results.get(timeout=0.5)
            except queue.Empty:
                continue
            if t == 0:
                seen.add(rank)
        self._ready = True

    def restart(self) -> None:
        self.close(graceful=False)
        self._start()

    def close(self, graceful: bool = True) -> None:
        if graceful:
            for q in self._tasks:
                q.put(None)
            deadline = time.monotonic() + 10
            for p in self._procs:
                p.join(timeout=max(0.1, deadline - time.monotonic()))
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self._procs = []

    def run(self, fn: Callable, mesh_shape: Sequence[int] | None, mesh_names: Sequence[str] | None = None,
            *args: Any, **kwargs: Any) -> list[Any]:
        """Run ``fn(mesh, *args, **kwargs)`` on every rank of a ``mesh_shape`` mesh.

        With ``mesh_shape=None`` every world rank runs ``fn(rank, world_size, *args, **kwargs)``.
        Returns the results of the ranks inside the mesh, in rank order.
        """
        if not self._ready:
            self._wait_ready()
        # a task the queues cannot send (e.g. a function defined inside a test) would fail in their feeder
        # threads and leave every rank waiting: fail here instead
        ForkingPickler.dumps((fn, mesh_shape, mesh_names, args, kwargs))
        self._tid += 1
        tid = self._tid
        for q in self._tasks:
            q.put((tid, fn, mesh_shape, mesh_names, args, kwargs))
        got: dict[int, tuple[bool, Any]] = {}
        deadline = time.monotonic() + self.timeout_s
        first_error_at = None
        while len(got) < self.world_size:
            now = time.monotonic()
            if now > deadline or (first_error_at is not None and now > first_error_at + 20):
                break
            try:
                t, rank, ok, out = self._results.get(timeout=0.5)
            except queue.Empty:
                if any(not p.is_alive() for p in self._procs):
                    break
                continue
            if t != tid:
                continue
            got[rank] = (ok, out)
            if not ok and first_error_at is None:
                first_error_at = time.monotonic()
        errors = [(r, out) for r, (ok, out) in sorted(got.items()) if not ok]
        if len(got) < self.world_size:
            missing = sorted(set(range(self.world_size)) - set(got))
            self.restart()
            if errors:
                raise WorkerError(f"rank {errors[0][0]} raised (ranks {missing} then hung; pool restarted):\n{errors[0][1]}")
            raise TimeoutError(f"ranks {missing} did not answer within {self.timeout_s}s; pool restarted")
        if errors:
            raise WorkerError(f"rank {errors[0][0]} raised:\n{errors[0][1]}")
        n = self.world_size if mesh_shape is None else int(torch.tensor(mesh_shape).prod())
        return [got[r][1] for r in range(n)]
