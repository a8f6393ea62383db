"""Sequence-parallel attention (ring and all-to-all) against dense float64 attention (gloo, CPU)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from meshpar.errors import ShardingError
from meshpar.mesh import CommCounter
from meshpar.ops import attention as A
from meshpar.ops.attention.block import block_backward, block_forward, merge_


# ----------------------------------------------------------------------------------------------- helpers
def _dense(q, k, v, causal, scale=None):
    """Reference: dense float64 SDPA output and dQ/dK/dV for upstream gradient ``do``."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def _reference(Q, K, V, dO, causal):
    q, k, v = (t.clone().requires_grad_(True) for t in (Q, K, V))
    o = _dense(q, k, v, causal)
    o.backward(dO)
    return o.detach(), q.grad, k.grad, v.grad


def _globals(seed, B, H, S, D, Sk=None):
    g = torch.Generator().manual_seed(seed)
    Sk = S if Sk is None else Sk
    mk = lambda s: torch.randn(B, H, s, D, generator=g, dtype=torch.float64)  # noqa: E731
    return mk(S), mk(Sk), mk(Sk), mk(S)


def _split(x, sp, me, balanced):
    if balanced:
        x = A.zigzag_permute(x, sp, dim=2)
    return x.chunk(sp, dim=2)[me].contiguous()


def _join(parts, sp, balanced):
    x = torch.cat(parts, dim=2)
    return A.zigzag_unpermute(x, sp, dim=2) if balanced else x


# ----------------------------------------------------------------------------------------------- worker fns
def _run_sp(mesh, Q, K, V, dO, causal, mode, balanced, impl):
    sp, me = mesh.size("sp"), mesh.axis_index("sp")
    q, k, v = (_split(t, sp, me, balanced).requires_grad_(True) for t in (Q, K, V))
    do = _split(dO, sp, me, balanced)
    with A.sequence_parallel(mode=mode, block_impl=impl):
        with CommCounter() as cf, A.attention_trace() as tr:
            o = A.sp_attention(q, k, v, mesh, "sp", causal=causal, balanced=balanced)
        with CommCounter() as cb, A.attention_trace() as trb:
            o.backward(do)
    return dict(o=o.detach(), dq=q.grad, dk=k.grad, dv=v.grad,
                fwd=(cf.calls.get(("sp",), 0), cf.bytes.get(("sp",), 0.0)),
                bwd=(cb.calls.get(("sp",), 0), cb.bytes.get(("sp",), 0.0)),
                log=(list(cf.log), list(cb.log)),
                work=(tr.work("fwd"), trb.work("bwd")))


def _check(out, Q, K, V, dO, causal, sp, balanced, tol=1e-9):
    ref = _reference(Q, K, V, dO, causal)
    for name, r in zip(("o", "dq", "dk", "dv"), ref):
        got = _join([o[name] for o in out], sp, balanced)
        assert got.shape == r.shape, name
        err = (got - r).abs().max().item()
        assert err < tol, f"{name}: max abs error {err}"


def _local_bytes(Q, sp):
    return Q.numel() // sp * Q.element_size()


# ----------------------------------------------------------------------------------------------- block level
@pytest.mark.parametrize("impl", ["math", "cpu_fused"])
@pytest.mark.parametrize("causal", [False, True])
def test_block_merge_equals_dense(impl, causal):
    """Split K/V in two, compute blocks, merge with LSE, backprop with the final out/LSE."""
    Q, K, V, dO = _globals(0, 2, 3, 8, 4)
    scale = 0.37
    ref_q, ref_k, ref_v = (t.clone().requires_grad_(True) for t in (Q, K, V))
    ref = _dense(ref_q, ref_k, ref_v, causal, scale)
    ref.backward(dO)
    # first half of the keys: the first 4 queries see it causally, the rest fully
    if causal:
        parts = [(slice(0, 4), slice(0, 4), True), (slice(4, 8), slice(0, 4), False), (slice(4, 8), slice(4, 8), True)]
    else:
        parts = [(slice(0, 8), slice(0, 4), False), (slice(0, 8), slice(4, 8), False)]
    out_acc = lse_acc = None
    for qs, ks, c in parts:
        o, l, _ = block_forward(Q[:, :, qs], K[:, :, ks], V[:, :, ks], causal=c, scale=scale, impl=impl)
        if out_acc is None:
            out_acc = torch.full_like(Q, 0.0)
            lse_acc = torch.full(Q.shape[:-1], float("-inf"), dtype=Q.dtype)
            out_acc[:, :, qs], lse_acc[:, :, qs] = o, l
        else:
            fresh = torch.isinf(lse_acc[:, :, qs]).all()
            if fresh:
                out_acc[:, :, qs], lse_acc[:, :, qs] = o, l
            else:
                merge_(out_acc[:, :, qs], lse_acc[:, :, qs], o, l)
    assert (out_acc - ref).abs().max() < 1e-12
    assert torch.allclose(lse_acc, torch.logsumexp(
        (Q @ K.transpose(-1, -2) * scale).masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1) if causal
                                                       else torch.zeros(8, 8, dtype=torch.bool), float("-inf")), -1))
    dq, dk, dv = torch.zeros_like(Q), torch.zeros_like(K), torch.zeros_like(V)
    for qs, ks, c in parts:
        a, b, d = block_backward(dO[:, :, qs], Q[:, :, qs], K[:, :, ks], V[:, :, ks], out_acc[:, :, qs],
                                 lse_acc[:, :, qs], causal=c, scale=scale, impl=impl)
        dq[:, :, qs] += a
        dk[:, :, ks] += b
        dv[:, :, ks] += d
    for got, r in ((dq, ref_q.grad), (dk, ref_k.grad), (dv, ref_v.grad)):
        assert (got - r).abs().max() < 1e-12


@settings(max_examples=25)
@given(cuts=st.lists(st.integers(1, 11), max_size=4, unique=True), order=st.randoms(use_true_random=False),
       impl=st.sampled_from(["math", "cpu_fused"]), seed=st.integers(0, 999))
def test_lse_merge_any_split_any_order(cuts, order, impl, seed):
    """Non-causal attention over 12 keys cut anywhere into blocks, merged in any order, equals dense."""
    Q, K, V, dO = _globals(seed, 1, 2, 5, 3, Sk=12)
    edges = [0] + sorted(cuts) + [12]
    blocks = [slice(a, b) for a, b in zip(edges, edges[1:])]
    order.shuffle(blocks)
    ref = _reference(Q, K, V, dO, False)
    out_acc = lse_acc = None
    for ks in blocks:
        o, l, _ = block_forward(Q, K[:, :, ks], V[:, :, ks], causal=False, scale=0.5, impl=impl)
        if out_acc is None:
            out_acc, lse_acc = o.clone(), l.clone()
        else:
            merge_(out_acc, lse_acc, o, l)
    q, k, v = (t.clone().requires_grad_(True) for t in (Q, K, V))
    r = F.scaled_dot_product_attention(q, k, v, scale=0.5)
    r.backward(dO)
    assert (out_acc - r.detach()).abs().max() < 1e-12
    dk = torch.zeros_like(K)
    dq = torch.zeros_like(Q)
    for ks in blocks:
        a, b, _ = block_backward(dO, Q, K[:, :, ks], V[:, :, ks], out_acc, lse_acc, causal=False, scale=0.5, impl=impl)
        dq += a
        dk[:, :, ks] += b
    assert (dq - q.grad).abs().max() < 1e-12 and (dk - k.grad).abs().max() < 1e-12
    del ref


@pytest.mark.parametrize("impl", ["flash", "efficient"])
def test_fused_cuda_paths_shapes_on_meta(impl):
    """The CUDA kernels' call signatures and output shapes, checked on the meta device."""
    q = torch.empty(1, 4, 40, 64, dtype=torch.bfloat16, device="meta")
    k = torch.empty(1, 4, 24, 64, dtype=torch.bfloat16, device="meta")
    o, lse, meta = block_forward(q, k, k, causal=False, scale=0.125, impl=impl)
    assert o.shape == q.shape and lse.shape == (1, 4, 40)
    dq, dk, dv = block_backward(o, q, k, k, o, lse.float(), causal=False, scale=0.125, impl=impl, meta=meta)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == k.shape


def test_select_impl():
    x = torch.zeros(1, 1, 2, 8)
    assert A.select_impl(x) == "math"
    with pytest.raises(ValueError, match="needs CUDA"):
        A.select_impl(x, "flash")


# ----------------------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("sp", [1, 2, 4, 8])
def test_zigzag_roundtrip_and_ranks(sp):
    x = torch.arange(4 * sp * 3).view(1, 1, -1, 1).float()
    p = A.zigzag_permute(x, sp)
    assert torch.equal(A.zigzag_unpermute(p, sp), x)
    c = x.shape[2] // (2 * sp)
    for r, blk in enumerate(p.chunk(sp, dim=2)):
        a, b = A.chunk_ids(r, sp, True)
        assert torch.equal(blk.flatten(), torch.cat([x.flatten()[a * c:(a + 1) * c], x.flatten()[b * c:(b + 1) * c]]))


@pytest.mark.parametrize("sp", [2, 4, 8])
def test_causal_load_balance_schedule(sp):
    balanced = [A.rank_work(r, sp, causal=True, balanced=True) for r in range(sp)]
    assert len(set(balanced)) == 1 and balanced[0] == 4 * sp  # (2 sp chunks)^2 / 2 pairs, per rank
    contiguous = [A.rank_work(r, sp, causal=True, balanced=False) for r in range(sp)]
    assert contiguous == [2 * r + 1 for r in range(sp)]  # rank r: r full pairs and one diagonal
    # every ring step of the balanced layout is one kernel call of half the rank's q x kv area
    for r in range(sp):
        for s in range(1, sp):
            blocks = A.step_blocks(r, (r - s) % sp, sp, causal=True, balanced=True, q_len=4, kv_len=4)
            assert len(blocks) == 1 and blocks[0].work(2) == 4


def test_pad_to_multiple():
    x = torch.randn(1, 2, 5, 3)
    p, pad = A.pad_to_multiple(x, 8)
    assert p.shape[2] == 8 and pad == 3 and torch.equal(p[:, :, :5], x)


# ----------------------------------------------------------------------------------------------- property tests
_cases = st.fixed_dictionaries(dict(
    sp=st.sampled_from([2, 4, 8]), B=st.integers(1, 2), H=st.integers(1, 3), D=st.sampled_from([2, 4, 8]),
    c=st.integers(1, 3), causal=st.booleans(), balanced=st.booleans(), seed=st.integers(0, 2 ** 16)))


@settings(max_examples=10)
@given(case=_cases)
def test_ring_matches_dense(pool, case):
    sp, B, H, D, c, causal, balanced = (case[k] for k in ("sp", "B", "H", "D", "c", "causal", "balanced"))
    S = sp * c * (2 if balanced else 1)
    Q, K, V, dO = _globals(case["seed"], B, H, S, D)
    out = pool.run(_run_sp, (sp,), ("sp",), Q, K, V, dO, causal, "ring", balanced, "math")
    _check(out, Q, K, V, dO, causal, sp, balanced)
    kv_bytes = 2 * _local_bytes(K, sp)
    for o in out:  # one K/V block per ring step forward; K/V plus the dK/dV accumulator backward
        assert o["fwd"] == (sp - 1, (sp - 1) * kv_bytes)
        assert o["bwd"] == (2 * sp - 1, (2 * sp - 1) * kv_bytes)
        for log in o["log"]:  # every ring step moves exactly one stacked K/V (or dK/dV) block
            assert {e for e in log} == {("ppermute", ("sp",), float(kv_bytes))}
    works = [o["work"] for o in out]  # (fwd, bwd) in half chunk-pairs, see layout.Block.work
    n = 2 if balanced else 1
    if not causal:
        assert works == [(2 * n * n * sp,) * 2] * sp
    elif balanced:
        assert works == [(4 * sp,) * 2] * sp  # equal work on every rank
    else:
        assert works == [(2 * r + 1,) * 2 for r in range(sp)]


@settings(max_examples=8)
@given(case=_cases, hm=st.integers(1, 2))
def test_all_to_all_matches_dense(pool, case, hm):
    sp, B, D, c, causal, balanced = (case[k] for k in ("sp", "B", "D", "c", "causal", "balanced"))
    H = sp * hm
    S = sp * c * (2 if balanced else 1)
    Q, K, V, dO = _globals(case["seed"], B, H, S, D)
    out = pool.run(_run_sp, (sp,), ("sp",), Q, K, V, dO, causal, "all_to_all", balanced, "math")
    _check(out, Q, K, V, dO, causal, sp, balanced)
    local = _local_bytes(Q, sp)
    for o in out:  # stacked q/k/v in, output back: (sp-1)/sp of 4 local blocks; backward mirrors it
        assert o["fwd"] == (2, (sp - 1) / sp * 4 * local)
        assert o["bwd"] == (2, (sp - 1) / sp * 4 * local)


@pytest.mark.parametrize("causal", [False, True])
def test_ring_cpu_fused_kernel(pool, causal):
    Q, K, V, dO = _globals(3, 1, 2, 16, 4)
    out = pool.run(_run_sp, (4,), ("sp",), Q, K, V, dO, causal, "ring", True, "cpu_fused")
    _check(out, Q, K, V, dO, causal, 4, True)


def test_ring_noncausal_cross_lengths(pool):
    Q, K, V, dO = _globals(5, 1, 2, 8, 4, Sk=12)
    out = pool.run(_run_sp, (4,), ("sp",), Q, K, V, dO, False, "ring", False, "math")
    _check(out, Q, K, V, dO, False, 4, False)


def _run_gqa(mesh, Q, K, V, dO, mode):
    sp, me = mesh.size("sp"), mesh.axis_index("sp")
    q, k, v = (_split(t, sp, me, True).requires_grad_(True) for t in (Q, K, V))
    with CommCounter() as c:
        o = A.sp_attention(q, k, v, mesh, "sp", causal=True, balanced=True, mode=mode, enable_gqa=True)
    o.backward(_split(dO, sp, me, True))
    return dict(o=o.detach(), dq=q.grad, dk=k.grad, dv=v.grad, fwd_bytes=c.bytes.get(("sp",), 0.0))


@pytest.mark.parametrize("mode", ["ring", "all_to_all"])
def test_grouped_query_attention(pool, mode):
    """8 query heads over 4 K/V heads; the ring carries the 4 K/V heads only."""
    g = torch.Generator().manual_seed(9)
    Q, dO = (torch.randn(1, 8, 16, 4, generator=g, dtype=torch.float64) for _ in range(2))
    K, V = (torch.randn(1, 4, 16, 4, generator=g, dtype=torch.float64) for _ in range(2))
    out = pool.run(_run_gqa, (4,), ("sp",), Q, K, V, dO, mode)
    q, k, v = (t.clone().requires_grad_(True) for t in (Q, K, V))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    ref.backward(dO)
    for name, r in (("o", ref.detach()), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert (_join([o[name] for o in out], 4, True) - r).abs().max() < 1e-9, name
    if mode == "ring":
        assert all(o["fwd_bytes"] == 3 * 2 * _local_bytes(K, 4) for o in out)


def _run_bf16(mesh, Q, K, V, dO):
    sp, me = mesh.size("sp"), mesh.axis_index("sp")
    q, k, v = (_split(t, sp, me, True).to(torch.bfloat16).requires_grad_(True) for t in (Q, K, V))
    o = A.sp_attention(q, k, v, mesh, "sp", causal=True, balanced=True)
    o.backward(_split(dO, sp, me, True).to(torch.bfloat16))
    return dict(o=o.detach().double(), dq=q.grad.double(), dk=k.grad.double(), dv=v.grad.double())


def test_ring_bf16_close(pool):
    Q, K, V, dO = _globals(7, 1, 2, 32, 8)
    out = pool.run(_run_bf16, (4,), ("sp",), Q, K, V, dO)
    _check(out, Q, K, V, dO, True, 4, True, tol=5e-2)


# ----------------------------------------------------------------------------------------------- composition
def _run_tp_sp(mesh, Q, K, V, dO, mode):
    tp, sp, me = mesh.size("tp"), mesh.size("sp"), mesh.axis_index("sp")
    t_i = mesh.axis_index("tp")
    pick = lambda t: _split(t.chunk(tp, 1)[t_i], sp, me, True)  # noqa: E731  heads over tp, sequence over sp
    q, k, v = (pick(t).requires_grad_(True) for t in (Q, K, V))
    bsh = lambda t: t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)  # noqa: E731  [B, S/sp, H/tp*D]
    o = A.sp_attention_bsh(bsh(q), bsh(k), bsh(v), head_dim=Q.shape[-1], mesh=mesh, axis="sp", causal=True,
                           mode=mode, balanced=True)
    o = o.view(o.shape[0], o.shape[1], -1, Q.shape[-1]).transpose(1, 2)
    o.backward(pick(dO))
    return dict(o=o.detach(), dq=q.grad, dk=k.grad, dv=v.grad)


@pytest.mark.parametrize("mode", ["ring", "all_to_all"])
def test_bsh_layout_with_tensor_parallel_heads(pool, mode):
    """GPT-style [B, S, H*D] activations: heads over tp=2, sequence over sp=4 (balanced)."""
    Q, K, V, dO = _globals(11, 2, 8, 16, 4)
    out = pool.run(_run_tp_sp, (2, 4), ("tp", "sp"), Q, K, V, dO, mode)
    ref = _reference(Q, K, V, dO, True)
    for i, name in enumerate(("o", "dq", "dk", "dv")):
        heads = [_join([out[t * 4 + s][name] for s in range(4)], 4, True) for t in range(2)]
        assert (torch.cat(heads, 1) - ref[i]).abs().max() < 1e-9, name


# ----------------------------------------------------------------------------------------------- bad input
def _bad(mesh, case):
    q = torch.zeros(1, 3, 4, 2, dtype=torch.float64)
    k = v = q
    kw = dict(causal=True)
    if case == "odd_balanced":
        q = k = v = torch.zeros(1, 2, 3, 2)
        kw.update(balanced=True)
    elif case == "heads_a2a":
        kw.update(mode="all_to_all")
    elif case == "mismatch":
        k = v = torch.zeros(1, 3, 4, 4, dtype=torch.float64)
    elif case == "causal_lengths":
        k = v = torch.zeros(1, 3, 6, 2, dtype=torch.float64)
    elif case == "ndim":
        q = torch.zeros(3, 4, 2)
    with CommCounter() as c:
        try:
            A.sp_attention(q, k, v, mesh, "sp", **kw)
        except ShardingError as e:
            return str(e), c.total_calls
    return None, c.total_calls


@pytest.mark.parametrize("case,match", [
    ("odd_balanced", "multiple of 2\\*sp = 8"), ("heads_a2a", "heads = 3 is not divisible by 4"),
    ("mismatch", "dim 3 \\(head dim\\)"), ("causal_lengths", "equal q and k/v"), ("ndim", r"\[B, H, S, D\]")])
def test_bad_input_errors_before_communication(pool, case, match):
    import re
    for msg, calls in pool.run(_bad, (4,), ("sp",), case):
        assert msg is not None and re.search(match, msg), msg
        assert calls == 0


def test_unsupported_sdpa_features():
    from meshpar.ops.attention.checks import check_call
    with pytest.raises(ShardingError, match="attn_mask.*is_causal=True"):
        check_call(attn_mask=torch.ones(2, 2))
    with pytest.raises(ShardingError, match="dropout_p=0.1"):
        check_call(dropout_p=0.1)
    with pytest.raises(ValueError, match="mode must be one of"):
        with A.sequence_parallel(mode="ulysses"):
            pass
    with pytest.raises(TypeError, match="Zigzag"):  # the layout is the spec's now
        with A.sequence_parallel(balanced=True):
            pass
