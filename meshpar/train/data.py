"""Data over the ``data`` mesh axis: a deterministic, resumable sampler and ``get_dataloader``.

Every rank of one data group (all tensor/sequence/pipeline ranks with the same ``data``
coordinate) sees the same batches; ranks with different ``data`` coordinates see disjoint ones.
The sampler's order depends only on (seed, epoch), and its position is part of its state, so a
resumed run reads exactly the batches the uninterrupted run would have.
"""
from __future__ import annotations

from typing import Any, Iterator, Sized

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..mesh import Mesh


class ShardedSampler(Sampler[int]):
    """Indices of this data rank: shuffle (seeded by seed+epoch), drop the ragged tail, stride by rank.

    ``state_dict()``/``load_state_dict()`` carry the epoch and how many samples of it were consumed.
    """

    def __init__(self, dataset: Sized, num_replicas: int, rank: int, shuffle: bool = True, seed: int = 0,
                 batch_size: int = 1):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        self.n = len(dataset)
        self.num_replicas, self.rank, self.shuffle, self.seed = num_replicas, rank, shuffle, seed
        self.batch_size = batch_size
        per = self.n // num_replicas
        self.num_samples = (per // batch_size) * batch_size
        if self.num_samples == 0:
            raise ValueError(f"dataset of {self.n} samples is too small for {num_replicas} data ranks x batch "
                             f"{batch_size}; use a smaller batch or more data")
        self.epoch = 0
        self.start = 0  # samples of this epoch already consumed (set by load_state_dict)

    def _order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            idx = torch.randperm(self.n, generator=g).tolist()
        else:
            idx = list(range(self.n))
        idx = idx[: self.num_samples * self.num_replicas]
        return idx[self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        order = self._order()[self.start:]
        self.start = 0
        return iter(order)

    def __len__(self) -> int:
        return self.num_samples - self.start

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self, consumed: int = 0) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.start = int(state["consumed"])


def get_dataloader(dataset: Dataset, batch_size: int | None = None, mesh: Mesh | None = None, *,
                   shuffle: bool = True, seed: int | None = None, num_workers: int = 0, axis: str = "data",
                   **kw: Any) -> DataLoader:
    """A DataLoader over this rank's share of ``dataset`` along the mesh ``axis``.

    Each batch is **this data rank's own** batch (rows ``[r*b, (r+1)*b)`` of the global batch; see
    :mod:`meshpar.train.batch`); the ranks of one data group get the same one. The engine places
    it as ``from_local(x, P("data"))`` for sharded models.

    Args:
        batch_size: the **per data rank** batch (the global batch divided by the data size).
            Default: the config's ``train.batch_size`` (global) divided by ``parallel.data``.
        mesh: the job's mesh; default: the current context's (set by ``launch``), else one process.
        shuffle, seed: the order is a function of (seed, epoch) only; ``seed`` defaults to the
            context's config seed (0 without a context).
    The sampler is ``loader.sampler`` (a :class:`ShardedSampler`); call ``set_epoch`` each epoch.
    """
    from .launch import _CURRENT

    ctx = _CURRENT.get()
    if mesh is None and ctx is not None:
        mesh = ctx.mesh
    if seed is None:
        seed = ctx.config.seed if ctx is not None else 0
    if mesh is not None and axis in mesh.names:
        n, r = mesh.size(axis), mesh.coord(axis)
    else:
        n, r = 1, 0
    if batch_size is None:
        glob = (ctx.config.section("train").get("batch_size") if ctx is not None else None)
        if glob is None:
            raise ValueError("get_dataloader needs batch_size= (per data rank), or a config with train.batch_size "
                             "(the global batch) set by launch(...)")
        if glob % n:
            raise ValueError(f"train.batch_size={glob} is not divisible by the {n} data ranks")
        batch_size = glob // n
    sampler = ShardedSampler(dataset, n, r, shuffle=shuffle, seed=seed, batch_size=batch_size)
    # an own generator: creating an iterator must not draw from the global RNG (exact resume)
    kw.setdefault("generator", torch.Generator().manual_seed(seed))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=num_workers, **kw)


class TokenDataset(Dataset):
    """Fixed-length windows of a 1-D token tensor: item i is ``(x, y)`` with y = x shifted by one.

    Windows start every ``stride`` tokens (default ``block_size``: non-overlapping).
    """

    def __init__(self, tokens: torch.Tensor, block_size: int, stride: int | None = None):
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
        self.tokens = tokens.long() if tokens.dtype != torch.long else tokens
        self.block_size = block_size
        self.stride = stride or block_size
        self.count = max(0, (len(tokens) - block_size - 1) // self.stride + 1)
        if self.count == 0:
            raise ValueError(f"{len(tokens)} tokens are too few for block_size {block_size}")

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = i * self.stride
        chunk = self.tokens[s: s + self.block_size + 1]
        return chunk[:-1], chunk[1:]
