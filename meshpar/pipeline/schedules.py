"""Pipeline schedules as explicit per-rank action tables.

A schedule for ``p`` pipe ranks, ``m`` micro-batches and ``v`` chunks (virtual stages) per
rank is a list, one entry per rank, of :class:`Action` s executed in order:

* ``F`` / ``B``: forward / backward of micro-batch ``mb`` on this rank's chunk ``chunk``.
* ``SEND_F`` / ``RECV_F``: the activation of ``(mb, chunk)`` (``chunk`` is the *sender's* chunk
  for ``SEND_F`` and the *receiver's* chunk for ``RECV_F``) to / from pipe rank ``peer``.
* ``SEND_B`` / ``RECV_B``: the gradient with respect to that activation, flowing back.

Semantics (what the executor does, and what :func:`meshpar.pipeline.simulate.simulate` checks):
a ``SEND_*`` posts an asynchronous send and never blocks; a ``RECV_*`` posts an asynchronous
receive (early, so the transfer overlaps the compute before it); the compute action that
consumes the message waits for it. Messages between a pair of ranks match in posting order.

Generators build the per-rank *compute order* (``F``/``B`` only) and then insert communication
mechanically with :func:`insert_comm`, so every schedule obeys the same rules.

Schedules:

* ``gpipe``: all forwards, then all backwards. Any ``m >= 1``, any ``v``. In flight: ``m * v``.
* ``1f1b``: ``p - r - 1`` warm-up forwards on rank ``r``, then alternate one forward and one
  backward, then drain. ``v == 1``. In flight on rank ``r``: ``min(p - r, m) <= p``.
* ``interleaved``: Megatron's interleaved 1F1B over ``v >= 2`` chunks; ``m`` must be a
  multiple of ``p``. Micro-batches run in groups of ``p`` per chunk. Warm-up on rank ``r``:
  ``2 (p - r - 1) + (v - 1) p`` chunk-forwards. Bubble shrinks by ``v``: ``(p-1)/(v m + p - 1)``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from ..errors import ShardingError

F, B = "F", "B"
SEND_F, RECV_F, SEND_B, RECV_B = "SEND_F", "RECV_F", "SEND_B", "RECV_B"
COMPUTE = (F, B)
SENDS = (SEND_F, SEND_B)
RECVS = (RECV_F, RECV_B)


@dataclasses.dataclass(frozen=True)
class Action:
    """One step of a rank's table. ``peer`` is a pipe index for communication, else ``None``."""

    kind: str
    mb: int
    chunk: int
    peer: int | None = None

    def __repr__(self) -> str:
        s = f"{self.kind}{self.mb}" + (f"c{self.chunk}" if self.chunk else "")
        return s + (f"@{self.peer}" if self.peer is not None else "")


Table = list[list[Action]]


@dataclasses.dataclass(frozen=True)
class Schedule:
    """An action table plus the parameters it was generated for."""

    name: str
    pipe_size: int
    num_microbatches: int
    chunks: int
    table: tuple[tuple[Action, ...], ...]

    @property
    def num_stages(self) -> int:
        """Number of virtual stages ``pipe_size * chunks``."""
        return self.pipe_size * self.chunks

    def actions(self, rank: int) -> tuple[Action, ...]:
        return self.table[rank]

    def compute_order(self, rank: int) -> list[Action]:
        return [a for a in self.table[rank] if a.kind in COMPUTE]

    def in_flight_bound(self, rank: int) -> int:
        """Maximal number of (micro-batch, chunk) activations held for backward on ``rank``."""
        p, m, v = self.pipe_size, self.num_microbatches, self.chunks
        if self.name == "gpipe":
            return m * v
        if self.name == "1f1b":
            return min(p - rank, m)
        return min(warmup_interleaved(rank, p, m, v) + 1, m * v)

    def theoretical_bubble(self, t_fwd: float = 1.0, t_bwd: float = 2.0) -> float:
        """Idle fraction of the classic analysis: ``(p-1)/(v m + p - 1)`` (GPipe and 1F1B: v=1)."""
        p, m = self.pipe_size, self.num_microbatches
        v = self.chunks if self.name == "interleaved" else 1
        if self.name == "gpipe" and self.chunks > 1:
            return (p - 1) / (m + p - 1)  # looping GPipe does not shrink the bubble per step
        return (p - 1) / (v * m + p - 1)


# ----------------------------------------------------------------------------- validation
def check_params(name: str, pipe_size: int, num_microbatches: int, chunks: int) -> None:
    """Raise a ShardingError naming the problem and the fix (before any communication)."""
    if name not in GENERATORS:
        raise ShardingError(f"unknown pipeline schedule {name!r}; choose one of {sorted(GENERATORS)}")
    if pipe_size < 1:
        raise ShardingError(f"pipe size must be >= 1, got {pipe_size}")
    if chunks < 1:
        raise ShardingError(f"chunks per rank must be >= 1, got {chunks}")
    if num_microbatches < 1:
        raise ShardingError(f"num_microbatches must be >= 1, got {num_microbatches}")
    if name == "1f1b" and chunks != 1:
        raise ShardingError(
            f"schedule '1f1b' runs one chunk per rank, got chunks={chunks}; use schedule='interleaved' "
            f"for several chunks per rank")
    if name == "interleaved":
        if chunks < 2:
            raise ShardingError(
                "schedule 'interleaved' needs chunks >= 2 virtual stages per rank; with one chunk use '1f1b'")
        if num_microbatches % pipe_size:
            raise ShardingError(
                f"schedule 'interleaved' needs num_microbatches to be a multiple of the pipe size "
                f"{pipe_size}, got {num_microbatches}; use "
                f"{max(pipe_size, (num_microbatches // pipe_size) * pipe_size)} or "
                f"{(num_microbatches // pipe_size + 1) * pipe_size}")


# ----------------------------------------------------------------------------- compute orders
def _gpipe_order(rank: int, p: int, m: int, v: int) -> list[Action]:
    fwd = [Action(F, mb, c) for c in range(v) for mb in range(m)]
    bwd = [Action(B, mb, c) for c in reversed(range(v)) for mb in range(m)]
    return fwd + bwd


def _1f1b_order(rank: int, p: int, m: int, v: int) -> list[Action]:
    warm = min(p - rank - 1, m)
    out = [Action(F, mb, 0) for mb in range(warm)]
    nf, nb = warm, 0
    while nb < m:
        if nf < m:
            out.append(Action(F, nf, 0))
            nf += 1
        out.append(Action(B, nb, 0))
        nb += 1
    return out


def warmup_interleaved(rank: int, p: int, m: int, v: int) -> int:
    """Number of warm-up chunk-forwards on ``rank`` in the interleaved schedule."""
    return min((p - rank - 1) * 2 + (v - 1) * p, m * v)


def _interleaved_order(rank: int, p: int, m: int, v: int) -> list[Action]:
    total = m * v

    def fwd(k: int) -> Action:
        group, pos = divmod(k, p * v)
        return Action(F, group * p + pos % p, pos // p)

    def bwd(k: int) -> Action:
        group, pos = divmod(k, p * v)
        return Action(B, group * p + pos % p, v - 1 - pos // p)

    warm = warmup_interleaved(rank, p, m, v)
    out = [fwd(k) for k in range(warm)]
    nf, nb = warm, 0
    while nb < total:
        if nf < total:
            out.append(fwd(nf))
            nf += 1
        out.append(bwd(nb))
        nb += 1
    return out


GENERATORS: dict[str, Callable[[int, int, int, int], list[Action]]] = {
    "gpipe": _gpipe_order,
    "1f1b": _1f1b_order,
    "interleaved": _interleaved_order,
}


# ----------------------------------------------------------------------------- communication
def _neighbours(rank: int, chunk: int, p: int, v: int) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """``(prev, next)`` as ``(rank, chunk)`` of the virtual stages around ``(rank, chunk)``."""
    s = chunk * p + rank
    prev = None if s == 0 else ((s - 1) % p, (s - 1) // p)
    nxt = None if s == p * v - 1 else ((s + 1) % p, (s + 1) // p)
    return prev, nxt


def insert_comm(order: Sequence[Action], rank: int, p: int, v: int) -> list[Action]:
    """Insert sends right after each compute and receives one compute early (for overlap).

    The receive a compute needs is posted just before the *previous* compute of this rank, so
    the transfer overlaps it; the first compute's receive is posted at the start.
    """
    recvs: list[list[Action]] = []
    sends: list[list[Action]] = []
    for a in order:
        prev, nxt = _neighbours(rank, a.chunk, p, v)
        if a.kind == F:
            recvs.append([Action(RECV_F, a.mb, a.chunk, prev[0])] if prev else [])
            sends.append([Action(SEND_F, a.mb, a.chunk, nxt[0])] if nxt else [])
        else:
            recvs.append([Action(RECV_B, a.mb, a.chunk, nxt[0])] if nxt else [])
            sends.append([Action(SEND_B, a.mb, a.chunk, prev[0])] if prev else [])
    out: list[Action] = []
    if order:
        out += recvs[0]
    for i, a in enumerate(order):
        if i + 1 < len(order):
            out += recvs[i + 1]
        out.append(a)
        out += sends[i]
    return out


def make_schedule(name: str, pipe_size: int, num_microbatches: int, chunks: int = 1) -> Schedule:
    """Generate the action table of schedule ``name`` (``gpipe``, ``1f1b``, ``interleaved``)."""
    check_params(name, pipe_size, num_microbatches, chunks)
    gen = GENERATORS[name]
    table = tuple(tuple(insert_comm(gen(r, pipe_size, num_microbatches, chunks), r, pipe_size, chunks))
                  for r in range(pipe_size))
    return Schedule(name, pipe_size, num_microbatches, chunks, table)
