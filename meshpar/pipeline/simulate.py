"""Run an action table without a model: message matching, deadlock detection, timeline.

The model is the executor's: sends never block; a receive is posted at its table position and
the compute that consumes it waits until the matching send has happened. Messages between two
ranks (either direction is its own channel) match in posting order, as torch.distributed
point-to-point does for one tag. A compute takes ``t_fwd`` or ``t_bwd``; a message is available
at the end of the compute that sent it (zero latency).

:func:`simulate` returns a :class:`Timeline` and raises :class:`ScheduleError` on any mismatched
message, missing or duplicated compute, backward before forward, or deadlock. A forward-only
table (:func:`~meshpar.pipeline.schedules.make_forward_schedule`) must run every forward and no
backward.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict, deque

from ..errors import ShardingError
from .schedules import B, COMPUTE, F, FORWARD, RECV_B, RECV_F, RECVS, SEND_B, SEND_F, SENDS, Action, Schedule

_MATCH = {SEND_F: RECV_F, SEND_B: RECV_B}


class ScheduleError(ShardingError):
    """An action table is inconsistent (mismatched messages, deadlock, wrong order)."""


@dataclasses.dataclass
class Timeline:
    """Start/end times of every compute action per rank, plus derived statistics."""

    schedule: Schedule
    events: list[list[tuple[float, float, Action]]]  # per rank: (start, end, action)
    max_in_flight: list[int]

    @property
    def makespan(self) -> float:
        return max((e[-1][1] for e in self.events if e), default=0.0)

    def busy(self, rank: int) -> float:
        return sum(end - start for start, end, _ in self.events[rank])

    @property
    def bubble_fraction(self) -> float:
        """Idle share of ``pipe_size x makespan`` rank-time."""
        total = self.makespan * len(self.events)
        return 1.0 - sum(self.busy(r) for r in range(len(self.events))) / total if total else 0.0


def _receiver_chunk(send: Action, sender: int, p: int) -> int:
    """Chunk on the receiving rank that a message from ``(sender, send.chunk)`` is for."""
    s = send.chunk * p + sender
    t = s + 1 if send.kind == SEND_F else s - 1
    return t // p


def simulate(sched: Schedule, t_fwd: float = 1.0, t_bwd: float = 2.0, *, rendezvous: bool = False) -> Timeline:
    """Execute ``sched``'s table in the executor's semantics; see the module docstring.

    With ``rendezvous=True`` each rank's operations towards one peer form a single in-order
    stream (both directions) and an operation completes only together with the peer's
    matching operation at the head of its stream -- the NCCL point-to-point model, where a
    send waits for its receive. A table that passes both models is safe on gloo and NCCL.
    """
    p, m, v = sched.pipe_size, sched.num_microbatches, sched.chunks
    tables = [list(sched.actions(r)) for r in range(p)]
    pos = [0] * p
    clock = [0.0] * p
    # channel (src, dst) -> deque of (message key, time available)
    sent: dict[tuple[int, int], deque] = defaultdict(deque)
    posted: dict[tuple[int, int], deque] = defaultdict(deque)   # receives posted, unmatched
    arrived: list[dict[tuple[str, int, int], float]] = [dict() for _ in range(p)]
    done_f: list[set] = [set() for _ in range(p)]
    done_b: list[set] = [set() for _ in range(p)]
    in_flight = [0] * p
    max_in_flight = [0] * p
    events: list[list[tuple[float, float, Action]]] = [[] for _ in range(p)]

    streams: dict[tuple[int, int], deque] = defaultdict(deque)  # rendezvous: (rank, peer) -> ops

    def match_streams(a: int, b: int) -> None:
        qa, qb = streams[(a, b)], streams[(b, a)]
        while qa and qb:
            (ka, keya, ta), (kb, keyb, tb) = qa[0], qb[0]
            if ka == kb:
                return  # two sends (or two receives) facing each other: wait, maybe forever
            if keya != keyb:
                raise ScheduleError(
                    f"{sched.name} p={p} m={m} v={v}: link {a}<->{b} pairs {keya} with {keyb}")
            qa.popleft()
            qb.popleft()
            dst = b if ka == "S" else a
            arrived[dst][keya] = max(ta, tb)

    def match(src: int, dst: int) -> None:
        if rendezvous and src != dst:  # a rank's link to itself is a local hand-over
            return match_streams(src, dst)
        q_s, q_r = sent[(src, dst)], posted[(src, dst)]
        while q_s and q_r:
            (key, t), want = q_s.popleft(), q_r.popleft()
            if key != want:
                raise ScheduleError(
                    f"{sched.name} p={p} m={m} v={v}: rank {dst} expects {want} from rank {src} "
                    f"but the next message on that channel is {key}")
            arrived[dst][key] = t

    def needs(r: int, a: Action) -> tuple[str, int, int] | None:
        s = a.chunk * p + r
        if a.kind == F and s > 0:
            return (RECV_F, a.mb, a.chunk)
        if a.kind == B and s < p * v - 1:
            return (RECV_B, a.mb, a.chunk)
        return None

    remaining = sum(len(t) for t in tables)
    while remaining:
        progressed = False
        for r in range(p):
            while pos[r] < len(tables[r]):
                a = tables[r][pos[r]]
                if a.kind in SENDS:
                    key = (_MATCH[a.kind], a.mb, _receiver_chunk(a, r, p))
                    if rendezvous and a.peer != r:
                        streams[(r, a.peer)].append(("S", key, clock[r]))
                    else:
                        sent[(r, a.peer)].append((key, clock[r]))
                    match(r, a.peer)
                elif a.kind in RECVS:
                    if rendezvous and a.peer != r:
                        streams[(r, a.peer)].append(("R", (a.kind, a.mb, a.chunk), clock[r]))
                    else:
                        posted[(a.peer, r)].append((a.kind, a.mb, a.chunk))
                    match(a.peer, r)
                else:
                    need = needs(r, a)
                    if need is not None and need not in arrived[r]:
                        break  # blocked on a receive
                    start = max(clock[r], arrived[r].pop(need) if need is not None else 0.0)
                    key = (a.mb, a.chunk)
                    if a.kind == F:
                        if key in done_f[r]:
                            raise ScheduleError(f"rank {r}: forward {a} twice")
                        done_f[r].add(key)
                        in_flight[r] += 1
                        max_in_flight[r] = max(max_in_flight[r], in_flight[r])
                        dur = t_fwd
                    else:
                        if key not in done_f[r]:
                            raise ScheduleError(f"rank {r}: backward {a} before its forward")
                        if key in done_b[r]:
                            raise ScheduleError(f"rank {r}: backward {a} twice")
                        done_b[r].add(key)
                        in_flight[r] -= 1
                        dur = t_bwd
                    clock[r] = start + dur
                    events[r].append((start, clock[r], a))
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {r: tables[r][pos[r]] for r in range(p) if pos[r] < len(tables[r])}
            raise ScheduleError(f"{sched.name} p={p} m={m} v={v} deadlocks: ranks blocked at {stuck}")
    want = {(mb, c) for mb in range(m) for c in range(v)}
    want_b = set() if sched.name == FORWARD else want
    for r in range(p):
        if done_f[r] != want or done_b[r] != want_b:
            what = "forward (and no backward)" if sched.name == FORWARD else "forward and backward"
            raise ScheduleError(f"rank {r} does not run the {what} of every (micro-batch, chunk) once")
        leftovers = [k for k, q in list(sent.items()) + list(posted.items()) + list(streams.items()) if q]
        if leftovers or arrived[r]:
            raise ScheduleError(f"unmatched messages on channels {leftovers} / {arrived[r]}")
    return Timeline(sched, events, max_in_flight)
