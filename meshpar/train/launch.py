"""Start a distributed job from a config and return a :class:`Context` (mesh, config, seeds, logger).

``launch`` initializes torch.distributed when it is not yet initialized (NCCL with GPUs, gloo
without) and builds the mesh of the config. Nothing module-level is mutated beyond the torch
process group itself, so several contexts (meshes of different layouts over the same world)
can live in one program.
"""
from __future__ import annotations

import atexit
import contextlib
import contextvars
import datetime
import hashlib
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist

from ..mesh import Mesh
from .config import Config, ConfigError, load_config


@dataclass
class Context:
    """Everything a training job needs to know about where it runs.

    Attributes:
        mesh: the mesh of the config's parallel layout.
        config: the validated :class:`~meshpar.train.config.Config`.
        rank, world_size, local_rank: this process in the world.
        device: ``cuda:<local_rank>`` on NCCL, else ``cpu``.
        logger: a logger whose INFO lines are printed on rank 0 only.
    """

    mesh: Mesh
    config: Config
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    logger: logging.Logger
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def seed(self) -> int:
        return self.config.seed

    def seed_for(self, vary: str | Sequence[str] = ()) -> int:
        """A seed equal on ranks that share their coordinates on ``vary`` and different otherwise.

        ``seed_for(())`` is the same on every rank (use it for parameter init);
        ``seed_for("data")`` differs across data ranks only; ``seed_for(mesh.names)`` is per rank.
        """
        axes = self.mesh.check_axes(vary)
        key = ",".join(f"{a}={self.mesh.coord(a)}" for a in sorted(axes))
        h = hashlib.sha256(f"{self.config.seed}|{key}".encode()).digest()
        return int.from_bytes(h[:7], "little")

    @property
    def seeds(self) -> dict[str, int]:
        """Per-axis seeds: ``{"global": ..., "<axis>": seed varying over that axis only, "rank": ...}``."""
        out = {"global": self.seed_for(())}
        out.update({a: self.seed_for(a) for a in self.mesh.names})
        out["rank"] = self.seed_for(self.mesh.names)
        return out

    @contextlib.contextmanager
    def rng(self, vary: str | Sequence[str] = (), offset: int = 0) -> Iterator[torch.Generator]:
        """Run a block under a torch RNG seeded by :meth:`seed_for` (restoring the outer RNG after).

        For dropout on activations sharded over the tensor axes, use ``ctx.rng(("data", "x", "y"))``:
        blocks of the same global tensor get different masks, replicas get the same ones.
        """
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed((self.seed_for(vary) + offset) % (2 ** 63))
            yield torch.default_generator

    def is_main(self) -> bool:
        return self.rank == 0

    @contextlib.contextmanager
    def use(self) -> Iterator["Context"]:
        """Make this the current context for a block (restoring the previous one after)."""
        token = _CURRENT.set(self)
        try:
            yield self
        finally:
            _CURRENT.reset(token)


#: The context that ``launch``/``launch_from_torch``/``launch_from_slurm`` set for what follows in
#: the process (a context variable, not a module global): ``get_dataloader`` and ``initialize``
#: use it when no ``mesh=``/``ctx=`` is given.
_CURRENT: contextvars.ContextVar[Context | None] = contextvars.ContextVar("meshpar_train_context", default=None)


def current_context(ctx: Context | None = None, *, what: str = "this call") -> Context:
    """``ctx`` when given, else the context set by the last ``launch`` in this process.

    Raises:
        RuntimeError: when neither exists.
    """
    if ctx is not None:
        return ctx
    cur = _CURRENT.get()
    if cur is None:
        raise RuntimeError(f"{what} needs a context: call meshpar.train.launch(config, rank, world_size, host, port) "
                           f"or launch_from_torch(config) first, or pass ctx=/mesh= explicitly")
    return cur


def set_context(ctx: Context | None) -> contextvars.Token:
    """Set the current context (what ``launch`` does); returns a token for ``_CURRENT.reset``."""
    return _CURRENT.set(ctx)


def default_backend() -> str:
    """``nccl`` when CUDA GPUs are visible, else ``gloo``."""
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() > 0 else "gloo"


def make_logger(rank: int, name: str = "meshpar") -> logging.Logger:
    """A logger for this rank: INFO on rank 0, WARNING elsewhere, lines prefixed with the rank."""
    logger = logging.getLogger(f"{name}.rank{rank}")
    if not logger.handlers:
        h = logging.StreamHandler(sys.stdout)
        h.setFormatter(logging.Formatter(f"[meshpar rank {rank}] %(message)s"))
        logger.addHandler(h)
        logger.propagate = False
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    return logger


def launch(config: str | os.PathLike | Mapping[str, Any] | Config, rank: int, world_size: int,
           host: str = "127.0.0.1", port: int | str = 29500, backend: str | None = None, local_rank: int | None = None,
           timeout_s: float = 300.0, overrides: Mapping[str, Any] | None = None,
           init_method: str | None = None) -> Context:
    """Initialize torch.distributed (unless it already is), build the config's mesh, and make the
    returned :class:`Context` the current one for what follows in the process (so
    ``get_dataloader(dataset, batch_size=...)`` and ``initialize(model, optimizer, criterion, dl)``
    need no ``mesh=``/``ctx=``; explicit arguments still win). The mesh also becomes the default
    mesh (as in ``with mesh:``), so layers such as :class:`meshpar.nn.Linear2D` find it.

    Args:
        config: path (.py/.toml), dict or Config.
        rank, world_size: this process and the world size.
        host, port: rendezvous address (TCP store) when the world is not initialized yet.
        backend: ``"nccl"``/``"gloo"``; default NCCL with GPUs, gloo without.
        local_rank: GPU index on this node (default ``rank % device_count``).
        overrides: dotted config overrides, e.g. ``{"train.steps": 10}``.
        init_method: torch.distributed init method (default ``tcp://host:port``).
    """
    cfg = load_config(config, world_size=world_size, overrides=overrides)
    logger = make_logger(rank)
    backend = backend or default_backend()
    if backend == "nccl":
        n = torch.cuda.device_count()
        local_rank = rank % n if local_rank is None else local_rank
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        local_rank = 0 if local_rank is None else local_rank
        device = torch.device("cpu")
    if not dist.is_initialized():
        # the world this launch creates is torn down at exit (joins gloo/NCCL threads: no
        # "terminate called without an active exception" when a script ends without destroying it)
        atexit.register(_teardown)
        timeout = datetime.timedelta(seconds=timeout_s)
        if init_method == "env://":
            dist.init_process_group(backend, store=_elastic_store(host, int(port), rank, world_size, timeout),
                                    rank=rank, world_size=world_size, timeout=timeout)
        else:
            dist.init_process_group(backend, init_method=init_method or f"tcp://{host}:{port}", rank=rank,
                                    world_size=world_size, timeout=timeout)
    elif dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise RuntimeError(f"torch.distributed is already initialized as rank {dist.get_rank()} of "
                           f"{dist.get_world_size()}, not rank {rank} of {world_size}")
    mesh = Mesh(cfg.parallel.mesh_shape, cfg.parallel.mesh_names, timeout_s=timeout_s)
    for note in cfg.notes:
        logger.info(note)
    logger.info(f"world {world_size} ({dist.get_backend()}), mesh {mesh}, precision {cfg.precision}, "
                f"zero stage {cfg.zero_stage}")
    torch.manual_seed(_rank_seed(cfg.seed, rank))
    ctx = Context(mesh=mesh, config=cfg, rank=rank, world_size=world_size, local_rank=local_rank,
                  device=device, logger=logger)
    _CURRENT.set(ctx)
    mesh.__enter__()  # the default mesh for what follows (as `with mesh:`), e.g. for meshpar.nn.Linear2D
    return ctx


def _teardown() -> None:
    """Destroy the default process group at interpreter exit, if the script has not already."""
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _elastic_store(host: str, port: int, rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store under torchrun, prefixed by the restart attempt.

    After an elastic restart the agent's store still holds the previous attempt's keys (the
    old gloo addresses); a per-attempt prefix keeps the new workers from reading them.
    """
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "False") == "True"
    store = dist.TCPStore(host, port, world_size, is_master=(not agent and rank == 0), timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"meshpar/attempt_{attempt}", store)


def _rank_seed(seed: int, rank: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}|rank={rank}".encode()).digest()[:7], "little")


def launch_from_torch(config: str | os.PathLike | Mapping[str, Any] | Config, backend: str | None = None,
                      **kw: Any) -> Context:
    """Launch from the environment ``torchrun`` sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)."""
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        host, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    except KeyError as e:
        raise RuntimeError(f"launch_from_torch: environment variable {e} is missing; start the script with "
                           f"`torchrun` or `meshpar run`, or call meshpar.train.launch(...)") from None
    local = int(os.environ.get("LOCAL_RANK", 0))
    # env:// lets torchrun's per-attempt rendezvous (elastic restarts) provide the store
    return launch(config, rank, world, host, port, backend=backend, local_rank=local, init_method="env://", **kw)


def launch_from_slurm(config: str | os.PathLike | Mapping[str, Any] | Config, host: str, port: int | str,
                      backend: str | None = None, **kw: Any) -> Context:
    """Launch from SLURM's environment (SLURM_PROCID, SLURM_NPROCS, SLURM_LOCALID) under ``srun``."""
    try:
        rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NPROCS"])
    except KeyError as e:
        raise RuntimeError(f"launch_from_slurm: environment variable {e} is missing; run under `srun`") from None
    local = int(os.environ.get("SLURM_LOCALID", 0))
    return launch(config, rank, world, host, port, backend=backend, local_rank=local, **kw)


def context_for(config: str | os.PathLike | Mapping[str, Any] | Config, mesh: Mesh | None = None,
                overrides: Mapping[str, Any] | None = None) -> Context:
    """A context over an already initialized world (e.g. a second layout in the same program)."""
    if not dist.is_initialized():
        raise RuntimeError("context_for needs an initialized torch.distributed world; use launch(...)")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(config, world_size=mesh.size() if mesh is not None else world, overrides=overrides)
    if mesh is None:
        mesh = Mesh(cfg.parallel.mesh_shape, cfg.parallel.mesh_names)
    elif (mesh.shape, mesh.names) != (cfg.parallel.mesh_shape, cfg.parallel.mesh_names):
        raise ConfigError(f"context_for: {mesh} does not match the config's layout "
                          f"{dict(zip(cfg.parallel.mesh_names, cfg.parallel.mesh_shape))}")
    device = mesh.device
    return Context(mesh=mesh, config=cfg, rank=rank, world_size=world,
                   local_rank=device.index or 0, device=device, logger=make_logger(rank))


__all__ = ["Context", "current_context", "set_context", "launch", "launch_from_torch", "launch_from_slurm", "context_for", "default_backend"]
