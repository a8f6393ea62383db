"""The chunk memory manager on a simulated device: eviction order (furthest next use), prefetch,
tensor states, and training in float64 equal to dense ``torch.optim.AdamW`` for several device
budgets (one forcing every chunk to move every step), with ZeRO over 2 data ranks; the host check."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import meshpar.memory as mm
from meshpar.memory.chunk import Chunk, TensorState, default_chunk_numel, pack
from meshpar.memory.manager import ChunkManager, MemoryPlacementError
from meshpar.memory.offload import adamw_fused_, adamw_reference_

IN, OUT, STEPS = 6, 3, 4
LR, WD = 0.01, 0.1
CHUNK = 80                      # elements: the three Linears land in three chunks
CB = CHUNK * 8                  # bytes of one float64 chunk


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, 10), nn.Tanh(), nn.Linear(10, 7), nn.Tanh(), nn.Linear(7, OUT)).double()


def batch(step: int, gb: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return (torch.randn(gb, IN, generator=g, dtype=torch.float64),
            torch.randn(gb, OUT, generator=g, dtype=torch.float64))


def dense(clip: float | None = None) -> dict[str, torch.Tensor]:
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    for s in range(STEPS):
        x, y = batch(s)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def offloaded(budget: int, memory: str, mesh=None, **kw):
    model = make_model()
    off = mm.offload(model, memory=memory, device="simulated", device_budget=budget, chunk_numel=CHUNK, lr=LR,
                     weight_decay=WD, mesh=mesh, **kw)
    for s in range(STEPS):
        x, y = batch(s)
        if mesh is not None and mesh.size("data") > 1:
            n, r = mesh.size("data"), mesh.coord("data")
            x, y = x.chunk(n)[r], y.chunk(n)[r]
        ((model(x) - y) ** 2).mean().backward()
        off.step()
        if off.clip_grad_norm is not None:       # the clipping was active
            assert float(off.last_grad_norm) > off.clip_grad_norm
    out = off.master_params()
    off.close()
    return out, off


def _close(a: dict, b: dict) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in b)


# ---------------------------------------------------------------------------- manager unit tests
def _manager(n: int, budget_chunks: int, lookahead: int = 0) -> ChunkManager:
    dev = mm.SimulatedDevice(capacity=budget_chunks * 8)
    chunks = []
    for i in range(n):
        c = Chunk(i, 1, torch.float64)
        c.host_payload = torch.full((1,), float(i), dtype=torch.float64)
        chunks.append(c)
    return ChunkManager(dev, chunks, budget=budget_chunks * 8, lookahead=lookahead)


def _replay(m: ChunkManager, trace):
    m.begin_step()
    for ids in trace:
        m.mark(ids)
        for i in ids:
            m.chunks[i].pins += 1
            m.access(m.chunks[i], protect=set(ids))
        m.prefetch(protect=set(ids))
        for i in ids:
            m.chunks[i].pins -= 1


def test_eviction_furthest_next_use():
    trace = [(0,), (1,), (2,), (0,), (3,), (1,)]
    m = _manager(4, budget_chunks=2)
    _replay(m, trace)                         # warm-up: LRU, records the trace
    m.end_warmup()
    m.evict_log.clear()
    for c in m.chunks:                        # start the measured step from an empty device
        if c.device_payload is not None:
            m.evict(c)
    m.evict_log.clear()
    _replay(m, trace)
    # moment 2 needs 2 with {0, 1} resident: 0 is used at 3, 1 at 5 -> evict 1;
    # moment 4 needs 3 with {0, 2}: 0 next at 6 (next step), 2 at 8 -> evict 2;
    # moment 5 needs 1 with {0, 3}: 0 at 6, 3 at 10 -> evict 3
    assert m.evict_log == [1, 2, 3]
    assert m.next_use(0, 3) == 6 and m.next_use(2, 2) == 8


def test_eviction_lru_before_trace():
    m = _manager(3, budget_chunks=2)
    _replay(m, [(0,), (1,), (0,), (2,)])
    assert m.evict_log == [1]                 # least recently used (0 was used at moment 2)


def test_prefetch_uploads_ahead():
    trace = [(0,), (1,), (2,), (3,)]
    m = _manager(4, budget_chunks=2, lookahead=1)
    _replay(m, trace)
    assert m.stats["prefetches"] == 0         # no prefetch without a trace
    m.end_warmup()
    up = m.stats["uploads"]
    _replay(m, trace)
    # every chunk but the first of the step was uploaded ahead of its moment
    assert m.stats["prefetches"] >= 3 and m.stats["prefetch_hits"] >= 3
    assert m.stats["uploads"] - up == 5      # 0..3, plus chunk 0 again for the next step (the trace repeats)
    assert m.chunks[0].device_payload is not None
    for c in m.chunks:                        # values arrive intact
        if c.device_payload is not None:
            assert float(c.device_payload[0]) == c.index


def test_unit_larger_than_budget_raises():
    m = _manager(3, budget_chunks=1)
    with pytest.raises(MemoryPlacementError, match="budget"):
        m.check_fits([[0, 1]])


def test_pack_first_use_order_and_chunk_size():
    ps = [nn.Parameter(torch.zeros(n)) for n in (30, 30, 50, 10)]
    layout = pack([(str(i), p) for i, p in enumerate(ps)], 64)
    assert [[(n, off) for n, _, off in c] for c in layout] == [[("0", 0), ("1", 30)], [("2", 0), ("3", 50)]]
    with pytest.raises(ValueError, match="chunk size"):
        pack([("big", nn.Parameter(torch.zeros(100)))], 64)
    c = default_chunk_numel([100, 40, 60], multiple=8)
    assert c >= 100 and c % 8 == 0


# ---------------------------------------------------------------------------- states and grads
def test_states_through_a_step():
    model = make_model()
    seen = {}

    def spy(name):
        def hook(mod, args, out):
            seen[name] = {t.state for t in off.info[id(mod.weight)].chunk.tensors if t.param is mod.weight}
        return hook

    off = mm.offload(model, memory="host", device="simulated", device_budget=CB, chunk_numel=CHUNK, lr=LR)
    model[2].register_forward_hook(spy("fc2"))   # registered after the manager's: sees the released state
    during = {}

    def pre(mod, args):                          # after the manager's pre-hook: the unit's tensors in use
        during["fc2"] = off.info[id(mod.weight)].state
    model[2].register_forward_pre_hook(pre)
    x, y = batch(0)
    loss = ((model(x) - y) ** 2).mean()
    assert during["fc2"] == TensorState.COMPUTE
    assert seen["fc2"] == {TensorState.HOLD}
    # between units the weight is a NaN placeholder unless its chunk is on the device
    c0 = off.info[id(model[0].weight)].chunk
    assert c0.device_payload is None and torch.isnan(model[0].weight).all()   # budget of one chunk: evicted
    loss.backward()
    assert all(t.state == TensorState.HOLD_AFTER_BWD for c in off.mgr.chunks for t in c.tensors)
    assert all(p.grad is None for p in model.parameters())     # gradients live in the parameter chunks
    off.step()
    assert all(t.state == TensorState.HOLD for c in off.mgr.chunks for t in c.tensors)
    rep = mm.report(off)
    assert len(rep.rows) == 4 * len(off.mgr.chunks)            # param + master + exp_avg + exp_avg_sq
    assert {r.kind for r in rep.rows} == {"param", "master", "exp_avg", "exp_avg_sq"}
    assert "chunk" in str(rep)
    off.close()


# ---------------------------------------------------------------------------- training equals dense
@pytest.mark.parametrize("budget,memory,moves", [
    (10 ** 6, "device", False),         # everything on the device
    (10 ** 6, "auto", False),           # auto: all optimizer state fits on the device
    (3 * CB + 3 * 3 * CB // 3, "auto", True),   # auto: params resident, state of the first chunk on the device
    (10 ** 6, "host", True),            # state on the host: CPU steps, parameters come back every step
    (CB, "host", True),                 # one chunk of budget: every chunk moves every step
    (CB, "auto", True),
])
def test_training_equals_dense(budget, memory, moves):
    ref = dense()
    got, off = offloaded(budget, memory)
    assert _close(got, ref) < 1e-12
    if moves:
        assert off.mgr.stats["uploads"] >= STEPS * len(off.mgr.chunks) // 2
    if budget == CB:
        assert off.mgr.stats["uploads"] >= STEPS * len(off.mgr.chunks)   # every chunk, every step
    if memory == "auto" and budget < 10 ** 6:
        where = [st.location for st in off.states]
        assert where[0] == ("device" if budget > CB else "host") and where[-1] == "host"


def test_overlap_off_and_reference_kernel_equal():
    ref = dense()
    got, _ = offloaded(CB, "host", overlap=False, cpu_step=adamw_reference_)
    assert _close(got, ref) < 1e-12


def test_flat_adamw_kernels_agree():
    g = torch.Generator().manual_seed(0)
    vals = [torch.randn(50, generator=g, dtype=torch.float64) for _ in range(3)]
    outs = []
    for fn in (adamw_reference_, adamw_fused_):
        p, m, v = vals[0].clone(), torch.zeros(50, dtype=torch.float64), torch.zeros(50, dtype=torch.float64)
        for step in (1, 2):
            fn(p, vals[step], m, v, step, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
        outs.append(p)
    assert float((outs[0] - outs[1]).abs().max()) < 1e-14


def test_host_too_small_raises_with_numbers():
    with pytest.raises(MemoryPlacementError, match=r"host must hold .* bytes.*only .* available"):
        mm.offload(make_model(), memory="host", device="simulated", device_budget=CB, chunk_numel=CHUNK,
                   host_capacity=1000)


def test_unit_selection_errors():
    with pytest.raises(ValueError, match="matches"):
        mm.offload(make_model(), units="nothing.*", device="simulated", device_budget=CB)
    model = make_model()
    with pytest.raises(ValueError, match="belong to no unit"):
        mm.offload(model, units=[model[0]], device="simulated", device_budget=CB)


# ---------------------------------------------------------------------------- ZeRO over 2 data ranks
def _zero_rank(mesh, budget, memory):
    got, off = offloaded(budget, memory, mesh=mesh)
    shard = {st.master.numel for st in off.states}
    return got, shard


@pytest.mark.parametrize("budget,memory", [(10 ** 6, "auto"), (CB, "host"), (3 * CB + 2 * CB, "auto")])
def test_zero_two_data_ranks_equals_dense(pool, budget, memory):
    ref = dense()
    outs = pool.run(_zero_rank, (2,), ("data",), budget, memory)
    for got, shard in outs:
        assert _close(got, ref) < 1e-12
        assert shard == {CHUNK // 2} or all(s * 2 >= CHUNK for s in shard)   # each rank holds half of each chunk


# ---------------------------------------------------------------------------- gradient clipping
CLIP = 0.2


@pytest.mark.parametrize("budget,memory", [(10 ** 6, "device"), (CB, "host"), (3 * CB + 3 * 3 * CB // 3, "auto")])
def test_clip_grad_norm_equals_dense(budget, memory):
    """``clip_grad_norm=`` equals ``torch.nn.utils.clip_grad_norm_`` before dense AdamW."""
    got, _ = offloaded(budget, memory, clip_grad_norm=CLIP)
    assert _close(got, dense(CLIP)) < 1e-12
    assert _close(got, dense()) > 1e-6           # and clipping changed the result


def _zero_clip_rank(mesh, budget, memory):
    return offloaded(budget, memory, mesh=mesh, clip_grad_norm=CLIP)[0]


@pytest.mark.parametrize("budget,memory", [(CB, "host"), (10 ** 6, "device")])
def test_clip_grad_norm_zero_two_data_ranks(pool, budget, memory):
    ref = dense(CLIP)
    for got in pool.run(_zero_clip_rank, (2,), ("data",), budget, memory):
        assert _close(got, ref) < 1e-12


def test_clip_grad_norm_must_be_positive():
    with pytest.raises(ValueError, match="clip_grad_norm"):
        mm.offload(make_model(), device="simulated", device_budget=CB, clip_grad_norm=0.0)


def test_host_step_in_place_equals_the_float32_copy_path(monkeypatch):
    """bf16 compute, fp32 master, one rank: the default host step runs AdamW straight from the chunk's bf16
    gradients and writes the bf16 parameters over them (cuda_ops CPU AdamW, or its torch fallback); it equals
    the float32-copy path (an explicit ``cpu_step``) to float32 rounding, and it really ran."""
    import meshpar.optim.cpu_adamw as ca
    calls = []
    real = ca.adamw_step_

    def spy(*a, **k):
        calls.append(k.get("bf16_out") is not None and k["bf16_out"].data_ptr() == a[1].data_ptr())
        return real(*a, **k)
    monkeypatch.setattr(ca, "adamw_step_", spy)

    def run(**kw):
        model = make_model().to(torch.bfloat16)
        off = mm.offload(model, memory="host", device="simulated", device_budget=2 * CHUNK * 2, chunk_numel=CHUNK,
                         lr=LR, weight_decay=WD, **kw)
        for s in range(STEPS):
            x, y = batch(s)
            ((model(x.bfloat16()) - y.bfloat16()).float() ** 2).mean().backward()
            off.step()
        off.synchronize()
        params = {c.index: c.host_payload.float().clone() for c in off.mgr.chunks}   # the bf16 parameters
        for st in off.states:   # each chunk's bf16 parameters are its fp32 master values, rounded
            assert torch.equal(st.chunk.host_payload[st.lo:st.hi], st.master.payload.to(torch.bfloat16))
        out = off.master_params()
        off.close()
        return out, params

    fast, fast_p = run()
    assert calls and all(calls)                  # in place: the output buffer is the gradient buffer
    n_fast = len(calls)
    slow, slow_p = run(cpu_step=adamw_reference_)
    assert len(calls) == n_fast                  # an explicit cpu_step keeps the float32-copy path
    assert all(v.dtype == torch.float32 for v in fast.values())
    assert max(float((fast[n] - slow[n]).abs().max()) for n in slow) < 1e-5
    assert max(float((fast_p[n] - slow_p[n]).abs().max()) for n in slow_p) < 1e-2   # bf16 copies: <= 1 ulp

