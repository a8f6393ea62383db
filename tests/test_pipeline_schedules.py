"""Schedule tables and partitioning, checked without running a model (no process group)."""
from __future__ import annotations

import pytest
import torch.nn as nn
from hypothesis import given, settings, strategies as st

from meshpar.errors import ShardingError
from meshpar.pipeline import ScheduleError, balanced, make_schedule, partition, simulate, uniform
from meshpar.pipeline.schedules import B, F, RECVS, SENDS, Action, Schedule, make_forward_schedule


@st.composite
def schedules(draw):
    name = draw(st.sampled_from(["gpipe", "1f1b", "interleaved"]))
    p = draw(st.integers(1, 8))
    if name == "interleaved":
        v = draw(st.integers(2, 4))
        m = p * draw(st.integers(1, 4))
    else:
        v = draw(st.integers(1, 3)) if name == "gpipe" else 1
        m = draw(st.integers(1, 12))
    return make_schedule(name, p, m, v)


def _channel_sequences(s: Schedule):
    """Per (src, dst): the message keys sent, and the keys the receiver expects, in table order."""
    p = s.pipe_size
    sent, expected = {}, {}
    for r in range(p):
        for a in s.actions(r):
            if a.kind in SENDS:
                stage = a.chunk * p + r
                to = stage + 1 if a.kind == "SEND_F" else stage - 1
                sent.setdefault((r, a.peer), []).append((a.kind[-1], a.mb, to // p))
                assert a.peer == to % p
            elif a.kind in RECVS:
                expected.setdefault((a.peer, r), []).append((a.kind[-1], a.mb, a.chunk))
    return sent, expected


@settings(max_examples=60)
@given(schedules())
def test_schedule_tables(s):
    p, m, v = s.pipe_size, s.num_microbatches, s.chunks
    # every send has a matching receive, in the same order, on the peer
    sent, expected = _channel_sequences(s)
    assert sent == expected
    # forward before backward, each (micro-batch, chunk) exactly once per rank
    for r in range(p):
        order = s.compute_order(r)
        assert sorted((a.kind, a.mb, a.chunk) for a in order) == sorted(
            (k, mb, c) for k in (F, B) for mb in range(m) for c in range(v))
        seen = set()
        for a in order:
            if a.kind == F:
                seen.add((a.mb, a.chunk))
            else:
                assert (a.mb, a.chunk) in seen
    # no deadlock, in-flight activations within the bound (1F1B <= stages)
    tl = simulate(s)
    simulate(s, rendezvous=True)          # also safe where a send waits for its receive (NCCL)
    for r in range(p):
        assert tl.max_in_flight[r] <= s.in_flight_bound(r)
        if s.name == "1f1b":
            assert tl.max_in_flight[r] <= p
    # the simulated bubble equals the textbook (p-1)/(v m + p - 1) (with chunks: when m >= p)
    if p > 1 and (v == 1 or m >= p):
        assert tl.bubble_fraction == pytest.approx(s.theoretical_bubble(), abs=1e-9)


@settings(max_examples=30)
@given(st.integers(1, 8), st.integers(1, 12), st.integers(1, 3))
def test_forward_only_tables(p, m, v):
    """Evaluation tables: every forward once per rank, activations only, safe in both models."""
    s = make_forward_schedule(p, m, v)
    sent, expected = _channel_sequences(s)
    assert sent == expected and all(k == "F" for seq in sent.values() for k, _, _ in seq)
    for r in range(p):
        assert sorted((a.mb, a.chunk) for a in s.compute_order(r)) == sorted(
            (mb, c) for mb in range(m) for c in range(v))
        assert all(a.kind == F for a in s.compute_order(r))
    simulate(s)
    simulate(s, rendezvous=True)


def test_rendezvous_model_catches_crossed_links():
    """Receiving before sending on a link is fine for gloo but deadlocks when sends rendezvous."""
    r0 = (Action("RECV_B", 0, 0, 1), Action("F", 0, 0), Action("SEND_F", 0, 0, 1), Action("B", 0, 0))
    r1 = (Action("RECV_F", 0, 0, 0), Action("F", 0, 0), Action("B", 0, 0), Action("SEND_B", 0, 0, 0))
    crossed = Schedule("gpipe", 2, 1, 1, (r0, r1))
    simulate(crossed)
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate(crossed, rendezvous=True)
    assert make_schedule("gpipe", 2, 1).table[0][:3] == (Action("F", 0, 0), Action("SEND_F", 0, 0, 1),
                                                          Action("RECV_B", 0, 0, 1))


def test_deadlock_and_mismatch_detected():
    s = make_schedule("1f1b", 2, 2)
    swapped = list(s.table[1])
    i, j = swapped.index(Action("RECV_F", 0, 0, 0)), swapped.index(Action("RECV_F", 1, 0, 0))
    swapped[i], swapped[j] = swapped[j], swapped[i]
    bad = Schedule(s.name, 2, 2, 1, (s.table[0], tuple(swapped)))
    with pytest.raises(ScheduleError, match="expects"):
        simulate(bad)
    # rank 1 backward first: it waits for a gradient nobody sends before its own forward
    r0 = tuple(a for a in s.table[0])
    r1 = (Action("RECV_B", 0, 0, 0),) + tuple(a for a in s.table[1])
    with pytest.raises(ScheduleError):
        simulate(Schedule(s.name, 2, 2, 1, (r0, r1)))


def test_schedule_errors():
    with pytest.raises(ShardingError, match="multiple of the pipe size 4"):
        make_schedule("interleaved", 4, 6, 2)
    with pytest.raises(ShardingError, match="interleaved"):
        make_schedule("1f1b", 4, 6, 2)
    with pytest.raises(ShardingError, match="chunks >= 2"):
        make_schedule("interleaved", 4, 8, 1)


@given(st.lists(st.integers(0, 50), min_size=1, max_size=12), st.integers(1, 12))
def test_balanced_partition_optimal(costs, n_stages):
    if n_stages > len(costs):
        with pytest.raises(ShardingError, match="at least one block"):
            balanced(costs, n_stages)
        return
    ranges = balanced(costs, n_stages)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(costs)
    assert all(a < b for a, b in ranges) and all(r[1] == q[0] for r, q in zip(ranges, ranges[1:]))
    got = max(sum(costs[a:b]) for a, b in ranges)
    # brute force over cut sets for small inputs
    import itertools
    best = min(max(sum(costs[a:b]) for a, b in zip((0,) + cuts, cuts + (len(costs),)))
               for cuts in itertools.combinations(range(1, len(costs)), n_stages - 1))
    assert got == best
    u = uniform(len(costs), n_stages)
    sizes = [b - a for a, b in u]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(costs)


def test_partition_methods():
    blocks = [nn.Linear(4, 4), nn.Linear(4, 64), nn.Linear(64, 4), nn.Linear(4, 4)]
    assert partition(blocks, 2) == [(0, 2), (2, 4)]
    assert partition(blocks, 2, "parameters") == [(0, 2), (2, 4)]
    assert partition(blocks, 3, "parameters") == [(0, 1), (1, 2), (2, 4)]  # 20 | 320 | 260+20
    assert partition(blocks, 3, [1, 3]) == [(0, 1), (1, 3), (3, 4)]
    with pytest.raises(ShardingError, match="strictly increasing"):
        partition(blocks, 3, [3, 1])
    with pytest.raises(ShardingError, match="boundaries"):
        partition(blocks, 3, [1])
