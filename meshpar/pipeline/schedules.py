"""Pipeline schedules as explicit per-rank action tables.

A schedule for ``p`` pipe ranks, ``m`` micro-batches and ``v`` chunks (virtual stages) per
rank is a list, one entry per rank, of :class:`Action` s executed in order:

* ``F`` / ``B``: forward / backward of micro-batch ``mb`` on this rank's chunk ``chunk``.
* ``SEND_F`` / ``RECV_F``: the activation of ``(mb, chunk)`` (``chunk`` is the *sender's* chunk
  for ``SEND_F`` and the *receiver's* chunk for ``RECV_F``) to / from pipe rank ``peer``.
* ``SEND_B`` / ``RECV_B``: the gradient with respect to that activation, flowing back.

Semantics (what the executor does, and what :func:`meshpar.pipeline.simulate.simulate` checks):
a ``SEND_*`` posts an asynchronous send; a ``RECV_*`` posts an asynchronous receive (early, so
the transfer overlaps the computes before its consumer); the compute action that consumes the
message waits for it. Messages between a pair of ranks match in posting order. Both ranks of a
link post its operations in one agreed order, so the tables are also safe where each link is a
single in-order stream on which a send waits for its receive (NCCL point-to-point).

Generators build the per-rank *compute order* (``F``/``B`` only) and then insert communication
mechanically with :func:`insert_comm`, so every schedule obeys the same rules.

Schedules:

* ``gpipe``: all forwards, then all backwards (with ``v`` chunks: breadth-first, chunk by chunk).
  Any ``m >= 1``, any ``v``. In flight: ``m * v``.
* ``1f1b``: ``p - r - 1`` warm-up forwards on rank ``r``, then alternate one forward and one
  backward, then drain. ``v == 1``. In flight on rank ``r``: ``min(p - r, m) <= p``.
* ``interleaved``: Megatron's interleaved 1F1B over ``v >= 2`` chunks; ``m`` must be a
  multiple of ``p``. Micro-batches run in groups of ``p`` per chunk. Warm-up on rank ``r``:
  ``2 (p - r - 1) + (v - 1) p`` chunk-forwards. Bubble shrinks by ``v``: ``(p-1)/(v m + p - 1)``.

:func:`make_forward_schedule` gives the forward-only table (evaluation): GPipe's forward half,
any ``m`` and ``v``, with no backward and no gradient messages.
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
        """Idle fraction of the classic analysis, ``(p-1)/(v m + p - 1)``.

        With ``v`` chunks per rank each chunk compute is ``1/v`` of a stage's, so the ramp-up and
        ramp-down shrink by ``v`` (interleaved 1F1B, and breadth-first "looping" GPipe alike).
        Exact for ``v == 1`` and for ``m >= p``; with fewer micro-batches than ranks a rank's next
        chunk waits for the wrap-around from the last rank, which adds idle time.
        """
        p, m, v = self.pipe_size, self.num_microbatches, self.chunks
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


def _compute_end_times(orders: Sequence[Sequence[Action]], p: int, v: int,
                       t_fwd: float = 1.0, t_bwd: float = 2.0) -> dict[tuple[int, str, int, int], float]:
    """End time of every compute ``(rank, kind, mb, chunk)`` when each rank runs its order
    sequentially and a compute starts once its input message has been produced."""
    last = p * v - 1
    end: dict[tuple[int, str, int, int], float] = {}
    pos, clock = [0] * p, [0.0] * p
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for r in range(p):
            while pos[r] < len(orders[r]):
                a = orders[r][pos[r]]
                s = a.chunk * p + r
                if a.kind == F:
                    dep = None if s == 0 else ((s - 1) % p, F, a.mb, (s - 1) // p)
                else:
                    dep = None if s == last else ((s + 1) % p, B, a.mb, (s + 1) // p)
                if dep is not None and dep not in end:
                    break
                start = max(clock[r], end[dep] if dep is not None else 0.0)
                clock[r] = start + (t_fwd if a.kind == F else t_bwd)
                end[(r, a.kind, a.mb, a.chunk)] = clock[r]
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {r: orders[r][pos[r]] for r in range(p) if pos[r] < len(orders[r])}
            raise ShardingError(f"compute orders deadlock (schedule bug): ranks blocked at {stuck}")
    return end


def insert_comm(orders: Sequence[Sequence[Action]], p: int, v: int) -> list[list[Action]]:
    """Add sends and receives to every rank's compute order.

    Messages between two ranks (both directions) get one agreed order: the order in which they
    are produced when the compute orders run with forward = 1, backward = 2. Both ranks post
    their operations on that link in exactly this order, which makes the table safe both where
    sends never block (gloo) and where each link is one in-order stream on which a send waits
    for its receive (NCCL point-to-point). A send is posted right after the compute that
    produces it; a receive as early as the link order allows (so the transfer overlaps the
    computes before its consumer).
    """
    end = _compute_end_times(orders, p, v)
    last = p * v - 1
    # every message: (producer key, sender, receiver, send action, recv action)
    links: dict[tuple[int, int], list[tuple[float, int, tuple, Action, Action, int]]] = {}
    for r in range(p):
        for a in orders[r]:
            s = a.chunk * p + r
            if a.kind == F and s < last:
                t = s + 1
                snd, rcv = Action(SEND_F, a.mb, a.chunk, t % p), Action(RECV_F, a.mb, t // p, r)
            elif a.kind == B and s > 0:
                t = s - 1
                snd, rcv = Action(SEND_B, a.mb, a.chunk, t % p), Action(RECV_B, a.mb, t // p, r)
            else:
                continue
            key = (r, a.kind, a.mb, a.chunk)
            links.setdefault((min(r, t % p), max(r, t % p)), []).append((end[key], r, key, snd, rcv, t % p))
    for msgs in links.values():
        msgs.sort(key=lambda m: (m[0], m[1], m[2]))
    tables: list[list[Action]] = []
    for r in range(p):
        seqs = {peer: links[(min(r, peer), max(r, peer))] for peer in range(p)
                if (min(r, peer), max(r, peer)) in links}
        ptr = {peer: 0 for peer in seqs}
        produced: set = set()
        posted: set = set()
        out: list[Action] = []

        def flush() -> None:
            for peer, msgs in seqs.items():
                while ptr[peer] < len(msgs):
                    _, sender, key, snd, rcv, receiver = msgs[ptr[peer]]
                    if sender == r:
                        if key not in produced:
                            break
                        out.append(snd)
                    if receiver == r:  # both, in that order, on a link between two chunks of one rank
                        out.append(rcv)
                        posted.add((rcv.kind, rcv.mb, rcv.chunk))
                    ptr[peer] += 1

        flush()
        for a in orders[r]:
            s = a.chunk * p + r
            need = (RECV_F if a.kind == F else RECV_B, a.mb, a.chunk)
            if ((a.kind == F and s > 0) or (a.kind == B and s < last)) and need not in posted:
                raise ShardingError(f"rank {r}: no receive posted before {a} (schedule bug)")
            out.append(a)
            produced.add((r, a.kind, a.mb, a.chunk))
            flush()
        tables.append(out)
    return tables


FORWARD = "forward"


def make_forward_schedule(pipe_size: int, num_microbatches: int, chunks: int = 1) -> Schedule:
    """The forward-only table (name ``"forward"``): every rank runs ``F`` of every micro-batch,
    chunk by chunk (GPipe's forward half), with the activation messages of :func:`insert_comm`."""
    check_params("gpipe", pipe_size, num_microbatches, chunks)
    orders = [[Action(F, mb, c) for c in range(chunks) for mb in range(num_microbatches)]
              for _ in range(pipe_size)]
    table = tuple(tuple(t) for t in insert_comm(orders, pipe_size, chunks))
    return Schedule(FORWARD, pipe_size, num_microbatches, chunks, table)


def make_schedule(name: str, pipe_size: int, num_microbatches: int, chunks: int = 1) -> Schedule:
    """Generate the action table of schedule ``name`` (``gpipe``, ``1f1b``, ``interleaved``)."""
    check_params(name, pipe_size, num_microbatches, chunks)
    gen = GENERATORS[name]
    orders = [gen(r, pipe_size, num_microbatches, chunks) for r in range(pipe_size)]
    table = tuple(tuple(t) for t in insert_comm(orders, pipe_size, chunks))
    return Schedule(name, pipe_size, num_microbatches, chunks, table)
