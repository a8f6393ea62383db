"""Property tests of the flat bucket layout (pure; no processes)."""
from __future__ import annotations

import torch
from hypothesis import given, strategies as st

from meshpar.optim.layout import plan_buckets


@given(sizes=st.lists(st.integers(1, 50), min_size=1, max_size=12), nd=st.sampled_from([1, 2, 3, 4, 8]),
       bucket_elems=st.integers(1, 120), groups=st.lists(st.integers(0, 1), min_size=12, max_size=12))
def test_buckets_cover_params_and_pad_evenly(sizes, nd, bucket_elems, groups):
    params = [torch.zeros(s, dtype=torch.float64) for s in sizes]
    groups = sorted(groups[:len(sizes)])
    named = [(g, f"p{i}", p) for i, (g, p) in enumerate(zip(groups, params))]
    for owner in range(nd):
        buckets = plan_buckets(named, nd, owner, bucket_elems * 8)
        seen = []
        for b in buckets:
            assert b.padded % nd == 0 and b.padded - b.numel < nd or b.numel < nd
            assert b.shard * nd == b.padded and b.lo == owner * b.shard
            assert len({named[int(e.name[1:])][0] for e in b.entries}) == 1  # one param group per bucket
            off = 0
            for e in b.entries:
                assert e.offset == off
                off += e.numel
                seen.append(e.name)
            assert off == b.numel
            if len(b.entries) > 1:
                assert b.numel * 8 <= bucket_elems * 8
        assert seen == [n for _, n, _ in named]  # every param exactly once, in order


@given(n=st.integers(1, 40), lo=st.integers(0, 45), width=st.integers(0, 20))
def test_entry_range(n, lo, width):
    (b,) = plan_buckets([(0, "p0", torch.zeros(n))], 1, 0, 1 << 20)
    r = b.entries[0].range_in(lo, lo + width)
    want = (max(lo, 0), min(lo + width, n))
    assert r == (want if want[0] < want[1] else None)
