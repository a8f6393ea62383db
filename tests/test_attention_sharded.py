"""``F.scaled_dot_product_attention`` on sequence-sharded ShardedTensors dispatches to ring /
all-to-all attention; a ``Zigzag("sp")`` sequence dim selects the load-balanced causal layout and
shard/unshard hide the permutation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import meshpar as mp
from meshpar import P
from meshpar.errors import ShardingError
from meshpar.mesh import CommCounter
from meshpar.ops import attention as A


def _globals(seed, B, H, S, D):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, S, D, generator=g, dtype=torch.float64) for _ in range(4)]


def _zigzag(spec: tuple) -> tuple:
    """The spec with its sequence dim (2) in the zigzag layout."""
    return tuple(mp.Zigzag(e) if d == 2 else e for d, e in enumerate(spec))


def _sharded_sdpa(mesh, Q, K, V, dO, causal, mode, spec, with_work=False):
    spec = P(*spec)
    q, k, v = (t.clone().requires_grad_(True) for t in (Q, K, V))
    with A.sequence_parallel(mode=mode), A.attention_trace() as tr:
        o = F.scaled_dot_product_attention(*(mp.shard(t, spec, mesh) for t in (q, k, v)), is_causal=causal)
    assert isinstance(o, mp.ShardedTensor) and o.spec == spec and o.shape == Q.shape
    og = mp.unshard(o)  # natural order in every layout
    with A.attention_trace() as trb:
        (og * dO).sum().backward()
    out = (og.detach(), q.grad, k.grad, v.grad)
    return out + ((tr.work("fwd"), trb.work("bwd")),) if with_work else out


def _ref(Q, K, V, dO, causal):
    q, k, v = (t.clone().requires_grad_(True) for t in (Q, K, V))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    o.backward(dO)
    return o.detach(), q.grad, k.grad, v.grad


@settings(max_examples=6)
@given(sp=st.sampled_from([2, 4, 8]), B=st.integers(1, 2), c=st.integers(1, 2), D=st.sampled_from([2, 4]),
       causal=st.booleans(), mode=st.sampled_from(["ring", "all_to_all"]), balanced=st.booleans(),
       seed=st.integers(0, 999))
def test_sdpa_rule_matches_dense(pool, sp, B, c, D, causal, mode, balanced, seed):
    H = sp if mode == "all_to_all" else 2
    S = sp * c * (2 if balanced else 1)
    Q, K, V, dO = _globals(seed, B, H, S, D)
    ref = _ref(Q, K, V, dO, causal)
    spec = (None, None, "sp", None)
    out = pool.run(_sharded_sdpa, (sp,), ("sp",), Q, K, V, dO, causal, mode, _zigzag(spec) if balanced else spec,
                   True)
    for res in out:
        for name, got, r in zip(("o", "dq", "dk", "dv"), res, ref):
            assert (got - r).abs().max() < 1e-9, name
    if mode == "ring" and causal:  # work per rank (half chunk-pairs), forward and backward, from the kernel trace
        works = [res[4] for res in out]
        assert works == ([(4 * sp,) * 2] * sp if balanced else [(2 * r + 1,) * 2 for r in range(sp)])


def test_sdpa_rule_heads_over_tp(pool):
    """Heads split over tp, sequence over sp (balanced ring): [B, H, S, D] with P(None, "tp", Zigzag("sp"), None)."""
    Q, K, V, dO = _globals(1, 1, 4, 16, 4)
    ref = _ref(Q, K, V, dO, True)
    for res in pool.run(_sharded_sdpa, (2, 4), ("tp", "sp"), Q, K, V, dO, True, "ring", _zigzag((None, "tp", "sp", None))):
        for got, r in zip(res, ref):
            assert (got - r).abs().max() < 1e-9


def test_sdpa_rule_sequence_over_two_axes(pool):
    """The ring may span a tuple of mesh axes: sequence over ("tp", "sp") = 8 ranks (contiguous)."""
    Q, K, V, dO = _globals(4, 1, 2, 32, 4)
    ref = _ref(Q, K, V, dO, True)
    for res in pool.run(_sharded_sdpa, (2, 4), ("tp", "sp"), Q, K, V, dO, True, "ring",
                        (None, None, ("tp", "sp"), None)):
        for got, r in zip(res, ref):
            assert (got - r).abs().max() < 1e-9


def _bad_rule(mesh, case):
    spec = P(None, None, "sp", None)
    x = torch.zeros(4, 4, 8, 2, dtype=torch.float64)
    q = k = v = mp.shard(x, spec, mesh)
    kw = {}
    if case == "mask":
        kw["attn_mask"] = torch.ones(8, 8, dtype=torch.bool)
    elif case == "dropout":
        kw["dropout_p"] = 0.5
    elif case == "specs":
        k = mp.shard(x, P(None, "sp"), mesh)
    elif case == "plain":
        v = x
    elif case == "mixed_layouts":  # a zigzag q with contiguous k/v: never computed silently
        q = mp.shard(x, P(None, None, mp.Zigzag("sp"), None), mesh)
    with CommCounter() as c, mp.strict():  # by default these would be resharded implicitly
        try:
            F.scaled_dot_product_attention(q, k, v, **kw)
        except ShardingError as e:
            return str(e), c.total_calls
    return None, c.total_calls


@pytest.mark.parametrize("case,match", [
    ("mask", "does not support attn_mask"), ("dropout", "dropout_p=0.5"), ("specs", "one spec"),
    ("plain", "one spec"), ("mixed_layouts", r"Zigzag\('sp'\).*one spec|one spec.*Zigzag\('sp'\)")])
def test_sdpa_rule_errors_before_communication(pool, case, match):
    import re
    for msg, calls in pool.run(_bad_rule, (4,), ("sp",), case):
        assert msg is not None and re.search(match, msg), msg
        assert calls == 0


def _unsharded_seq(mesh, Q):
    q = mp.shard(Q, P("sp"), mesh)  # batch split: the generic local rule handles it
    o = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    return mp.unshard(o)


def test_batch_sharded_falls_through_to_local_rule(pool):
    Q = _globals(2, 4, 2, 6, 4)[0]
    ref = F.scaled_dot_product_attention(Q, Q, Q, is_causal=True)
    for o in pool.run(_unsharded_seq, (4,), ("sp",), Q):
        assert (o - ref).abs().max() < 1e-12
