"""cuda_ops on the CPU machine: the loader, the JIT-built CPU AdamW (g++ + ninja; about 5-15 s the first
time on a loaded 2-core machine, then cached), its forced fallback, and the fused linear + cross-entropy
(dense and vocab/token-parallel on gloo) against ``F.cross_entropy(x @ W.T)`` in float64."""
from __future__ import annotations

import logging
import shutil

import pytest
import torch
import torch.nn.functional as F

import cuda_ops
from meshpar.optim.cpu_adamw import CPUAdamW, _torch_step, adamw_step_
from meshpar.ops.fused_loss import fused_linear_cross_entropy


@pytest.fixture
def no_kernels(monkeypatch):
    monkeypatch.setenv("MESHPAR_DISABLE_KERNELS", "1")


def _have_toolchain() -> bool:
    return shutil.which("g++") is not None and shutil.which("ninja") is not None


# ---------------------------------------------------------------- loader


def test_status_reports_every_kernel(monkeypatch):
    monkeypatch.setenv("MESHPAR_ENABLE_KERNELS", "all")  # past the opt-in: the reason must name the missing CUDA
    st = cuda_ops.build_all()
    assert set(st) == set(cuda_ops.KERNELS)
    for name, s in st.items():
        assert s.state in ("built", "fallback", "failed"), (name, s)
        if cuda_ops.KERNELS[name].cuda and not torch.cuda.is_available():
            assert s.state == "fallback" and "CUDA" in s.reason
    if _have_toolchain():
        assert st["cpu_adamw"].state == "built", st["cpu_adamw"].reason


def test_unverified_cuda_kernels_are_opt_in(monkeypatch):
    """A CUDA kernel not yet verified on a GPU is never used by default, and says how to opt in."""
    monkeypatch.delenv("MESHPAR_ENABLE_KERNELS", raising=False)
    monkeypatch.delenv("MESHPAR_DISABLE_KERNELS", raising=False)
    for name, spec in cuda_ops.KERNELS.items():
        if spec.cuda and not spec.verified:
            s = cuda_ops.status(name)
            assert s.state == "fallback" and "MESHPAR_ENABLE_KERNELS" in s.reason, (name, s)
            assert cuda_ops.load(name) is None


def test_disable_env_forces_fallback(no_kernels):
    assert cuda_ops.load("cpu_adamw") is None
    assert cuda_ops.status("cpu_adamw").state == "fallback"


def test_failed_build_is_a_logged_fallback(monkeypatch, tmp_path, caplog):
    """A kernel whose source does not compile gives a 'failed' status and one warning, never an exception."""
    bad = tmp_path / "broken.cpp"
    bad.write_text('extern "C" int f() { return this is not C++; }\n')
    spec = cuda_ops.KernelSpec("broken_test", (str(bad),), cuda=False, functions={})
    monkeypatch.setitem(cuda_ops.KERNELS, "broken_test", spec)
    monkeypatch.setenv("MESHPAR_OPS_CACHE", str(tmp_path / "cache"))
    if not _have_toolchain():
        pytest.skip("no g++/ninja: the failure path is the 'no compiler' fallback")
    with caplog.at_level(logging.WARNING, logger="cuda_ops"):
        assert cuda_ops.load("broken_test") is None
        assert cuda_ops.load("broken_test") is None
    s = cuda_ops.status("broken_test")
    assert s.state == "failed" and s.reason
    assert sum("broken_test" in r.getMessage() for r in caplog.records) == 1
    cuda_ops._status.cache_clear()


# ---------------------------------------------------------------- CPU AdamW


def _run_adamw(make_opt, params0, grads, wd):
    ps = [p.clone().requires_grad_() for p in params0]
    opt = make_opt(ps, wd)
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in ps], opt


@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "fallback"])
def test_cpu_adamw_matches_torch(monkeypatch, wd, kernel):
    if kernel and not _have_toolchain():
        pytest.skip("no g++/ninja")
    if not kernel:
        monkeypatch.setenv("MESHPAR_DISABLE_KERNELS", "cpu_adamw")
    g = torch.Generator().manual_seed(1)
    params0 = [torch.randn(1000, 37, generator=g), torch.randn(70001, generator=g), torch.randn(3, generator=g)]
    grads = [[torch.randn(p.shape, generator=g) for p in params0] for _ in range(6)]
    kw = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8)
    ours, opt = _run_adamw(lambda ps, wd: CPUAdamW(ps, weight_decay=wd, **kw), params0, grads, wd)
    ref, ropt = _run_adamw(lambda ps, wd: torch.optim.AdamW(ps, weight_decay=wd, foreach=False, **kw),
                           params0, grads, wd)
    assert (cuda_ops.load("cpu_adamw") is not None) == kernel
    for a, b in zip(ours, ref):
        assert not torch.equal(a, torch.zeros_like(a))
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-7)
    for p, rp in zip(opt.param_groups[0]["params"], ropt.param_groups[0]["params"]):
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][k], ropt.state[rp][k], rtol=2e-6, atol=2e-7)


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "fallback"])
def test_adamw_step_bf16_grad_and_copy_out(monkeypatch, kernel):
    if kernel and not _have_toolchain():
        pytest.skip("no g++/ninja")
    if not kernel:
        monkeypatch.setenv("MESHPAR_DISABLE_KERNELS", "cpu_adamw")
    g = torch.Generator().manual_seed(2)
    n = 50_003
    p, m, v = torch.randn(n, generator=g), torch.randn(n, generator=g) * 0.1, torch.rand(n, generator=g) * 0.01
    grad = torch.randn(n, generator=g).bfloat16()
    p.view(-1)[:3] = torch.tensor([float("nan"), 3.0e38, -1.0e-40])  # NaN, near-overflow, subnormal
    ref = [t.clone() for t in (p, m, v)]
    out = torch.full((n,), 7.0, dtype=torch.bfloat16)  # poisoned
    adamw_step_(p, grad, m, v, 1e-3, 0.9, 0.999, 1e-8, 0.05, 3, bf16_out=out)
    rp, rm, rv = ref
    _torch_step(rp, grad, rm, rv, 1e-3, 0.9, 0.999, 1e-8, 0.05, 3, None)  # torch's single-tensor AdamW, op for op
    torch.testing.assert_close(p, rp, rtol=2e-6, atol=2e-7, equal_nan=True)
    torch.testing.assert_close(m, rm, rtol=2e-6, atol=2e-7)
    want = p.bfloat16()
    assert torch.equal(out.isnan(), want.isnan()) and out.isnan()[0]
    fin = ~want.isnan()
    assert torch.equal(out[fin].view(torch.int16), want[fin].view(torch.int16))  # bit-exact RNE copy-out


def test_adamw_step_rejects_bad_args():
    with pytest.raises(ValueError, match="grad"):
        adamw_step_(torch.zeros(4), torch.zeros(5), torch.zeros(4), torch.zeros(4), 1e-3, 0.9, 0.999, 1e-8, 0.0, 1)
    with pytest.raises(ValueError, match="param"):
        adamw_step_(torch.zeros(4, dtype=torch.float64), torch.zeros(4), torch.zeros(4), torch.zeros(4), 1e-3, 0.9,
                    0.999, 1e-8, 0.0, 1)
    with pytest.raises(ValueError, match="step"):
        adamw_step_(torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(4), 1e-3, 0.9, 0.999, 1e-8, 0.0, 0)


# ---------------------------------------------------------------- fused linear + cross-entropy


def _dense_ref(x, w, t, ignore_index=-100, reduction="mean", vocab_size=None):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    logits = x @ w.T
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1), ignore_index=ignore_index,
                           reduction=reduction)
    (loss * 1.7).backward()
    return loss.detach(), x.grad, w.grad


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk", [None, 1, 5, 64])
def test_fused_loss_matches_dense(reduction, chunk):
    g = torch.Generator().manual_seed(3)
    B, T, Cd, V = 3, 7, 16, 29
    x = torch.randn(B, T, Cd, generator=g, dtype=torch.float64)
    w = torch.randn(V, Cd, generator=g, dtype=torch.float64)
    t = torch.randint(0, V, (B, T), generator=g)
    t[0, :3] = -100
    t[2, 6] = -100
    ref = _dense_ref(x, w, t, reduction=reduction)
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fused_linear_cross_entropy(xa, wa, t, reduction=reduction, chunk_size=chunk)
    (loss * 1.7).backward()
    torch.testing.assert_close(loss, ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xa.grad, ref[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(wa.grad, ref[2], rtol=1e-10, atol=1e-12)


def test_fused_loss_padded_vocab_and_float32():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(20, 8, generator=g)
    w = torch.randn(13, 8, generator=g)
    t = torch.randint(0, 10, (20,), generator=g)
    ref = _dense_ref(x.double(), w.double(), t, vocab_size=10)
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    (fused_linear_cross_entropy(xa, wa, t, vocab_size=10, chunk_size=6) * 1.7).backward()
    torch.testing.assert_close(xa.grad.double(), ref[1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(wa.grad.double(), ref[2], rtol=1e-4, atol=1e-6)
    assert torch.all(wa.grad[10:] == 0)


def test_fused_loss_no_weight_grad_and_errors():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, dtype=torch.float64)
    t = torch.tensor([0, 1, -100, 4])
    fused_linear_cross_entropy(x, w, t, chunk_size=2).backward()
    torch.testing.assert_close(x.grad, _dense_ref(x, w, t)[1] / 1.7)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(x, w, t, reduction="none")
    with pytest.raises(Exception, match="targets"):
        fused_linear_cross_entropy(x, w, t[:3])


def _parallel_case(mesh, vocab_axes, batch_axes, seed, vocab_size):
    g = torch.Generator().manual_seed(seed)
    N, Cd, V = 12, 6, 20
    x = torch.randn(N, Cd, generator=g, dtype=torch.float64)
    w = torch.randn(V, Cd, generator=g, dtype=torch.float64)
    t = torch.randint(0, vocab_size, (N,), generator=g)
    t[1] = t[7] = -100
    ref = _dense_ref(x, w, t, vocab_size=vocab_size)
    nv = mesh.size(vocab_axes) if vocab_axes else 1
    nb = mesh.size(batch_axes) if batch_axes else 1
    rv = mesh.axis_index(vocab_axes) if vocab_axes else 0
    rb = mesh.axis_index(batch_axes) if batch_axes else 0
    wl = w.chunk(nv)[rv].clone().requires_grad_()
    xl = x.chunk(nb)[rb].clone().requires_grad_()
    tl = t.chunk(nb)[rb]
    loss = fused_linear_cross_entropy(xl, wl, tl, chunk_size=4, vocab_size=vocab_size, mesh=mesh,
                                      vocab_axes=vocab_axes, batch_axes=batch_axes)
    (loss * 1.7).backward()
    dw = wl.grad
    if batch_axes:  # the weight gradient is partial over the token-parallel axes
        dw = C_all_reduce(dw, mesh, batch_axes)
    err = max(float((loss - ref[0]).abs()), float((xl.grad - ref[1].chunk(nb)[rb]).abs().max()),
              float((dw - ref[2].chunk(nv)[rv]).abs().max()))
    return err


def C_all_reduce(x, mesh, axes):
    from meshpar.mesh import collectives as C
    return C.all_reduce(x, mesh, axes)


@pytest.mark.parametrize("shape,names,va,ba,vocab", [
    ((2,), ("v",), "v", None, 20),
    ((2,), ("v",), "v", None, 17),
    ((2, 2), ("b", "v"), "v", "b", 20),
])
def test_fused_loss_vocab_parallel(pool, shape, names, va, ba, vocab):
    errs = pool.run(_parallel_case, shape, names, va, ba, 5, vocab)
    assert max(errs) < 1e-12, errs
