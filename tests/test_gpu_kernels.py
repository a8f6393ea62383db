"""Every cuda_ops CUDA kernel equals its torch fallback, values and gradients (one GPU).

Run on the GPU machine: ``python -m pytest -q -m gpu tests/test_gpu_kernels.py``. Skipped with a reason
without CUDA or without nvcc (the kernel is then not built and the fallback is what runs); a kernel
whose build *failed* where it should build is a test failure. Fresh random inputs for every case; the
caching allocator's free memory is filled with NaN first, so unwritten outputs show.
"""
from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

import cuda_ops

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (cuda_ops CUDA kernels)")]

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.fixture(autouse=True)
def _opt_in_unverified_kernels(monkeypatch):
    """These tests are the GPU check that verifies a kernel: opt every kernel in while they run."""
    monkeypatch.setenv("MESHPAR_ENABLE_KERNELS", "all")


def need(name: str) -> None:
    st = cuda_ops.status(name)
    if st.state == "failed":
        pytest.fail(f"cuda_ops kernel {name} failed to build: {st.reason}")
    if st.state != "built":
        pytest.skip(f"cuda_ops kernel {name} not built here: {st.reason}")


def poison(n: int) -> None:
    t = torch.full((n,), float("nan"), device="cuda")
    del t


def _run(fn, inputs, g):
    ins = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*ins)
    out.backward(g)
    return out.detach(), [t.grad for t in ins]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7,), (3, 5, 9), (2, 48, 128), (2, 3, 4, 5, 16)])
def test_hash_dropout_equals_torch_path(monkeypatch, dtype, shape):
    need("dropout")
    from meshpar.ops.dropout import dropout_local

    gen = torch.Generator(device="cuda").manual_seed(zlib.crc32(repr((dtype, shape)).encode()))
    x = torch.randn(shape, device="cuda", generator=gen).to(dtype)
    g = torch.randn(shape, device="cuda", generator=gen).to(dtype)
    offs = [int(v) for v in torch.randint(0, 10_000, (len(shape),), generator=gen, device="cuda")]
    if len(shape) > 1:  # explicit global positions (a zigzag dim)
        offs[-2] = torch.randperm(4 * shape[-2], device="cuda", generator=gen)[: shape[-2]]
    p, seed, site = 0.3, 2**40 + 12345, 9
    poison(x.numel() * 4)
    out, (gx,) = _run(lambda t: dropout_local(t, offs, p, seed, site), [x], g)
    monkeypatch.setenv("MESHPAR_DISABLE_KERNELS", "dropout")
    ref, (rgx,) = _run(lambda t: dropout_local(t, offs, p, seed, site), [x], g)
    assert torch.equal(out, ref) and torch.equal(gx, rgx)
    assert 0.5 < float((out != 0).float().mean()) < 0.9  # roughly 1 - p kept


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bias_dropout_add_equals_torch_path(monkeypatch, dtype):
    need("dropout")
    from cuda_ops.dropout import bias_dropout_add

    gen = torch.Generator(device="cuda").manual_seed(3)
    shape = (4, 37, 64)
    x, r, g = (torch.randn(shape, device="cuda", generator=gen).to(dtype) for _ in range(3))
    b = torch.randn(shape[-1], device="cuda", generator=gen).to(dtype)
    offs = (2, 100, 0)
    poison(x.numel() * 4)
    out, grads = _run(lambda t, bb, rr: bias_dropout_add(t, bb, rr, offs, 0.2, 77, 1), [x, b, r], g)
    monkeypatch.setenv("MESHPAR_DISABLE_KERNELS", "dropout")
    ref, rgrads = _run(lambda t, bb, rr: bias_dropout_add(t, bb, rr, offs, 0.2, 77, 1), [x, b, r], g)
    assert torch.equal(out, ref)
    assert torch.equal(grads[0], rgrads[0]) and torch.equal(grads[2], rgrads[2])
    tol = 1e-6 if dtype in (torch.float32, torch.float64) else 1e-2
    torch.testing.assert_close(grads[1], rgrads[1], rtol=tol, atol=tol * float(rgrads[1].abs().max()))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bias_gelu_equals_eager(approximate, dtype):
    need("bias_act")
    from cuda_ops.bias_act import bias_gelu

    gen = torch.Generator(device="cuda").manual_seed(4)
    for shape in [(5, 3), (64, 256), (2, 7, 40)]:
        x = (torch.randn(shape, device="cuda", generator=gen) * 3).to(dtype)
        g = torch.randn(shape, device="cuda", generator=gen).to(dtype)
        b = torch.randn(shape[-1], device="cuda", generator=gen).to(dtype)
        poison(x.numel() * 4)
        out, grads = _run(lambda t, bb: bias_gelu(t, bb, approximate), [x, b], g)
        ref, rgrads = _run(lambda t, bb: F.gelu(t + bb, approximate=approximate), [x, b], g)
        rtol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
        for a, e in zip([out, *grads], [ref, *rgrads]):
            torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * float(e.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("B,H,Hkv,S,D", [(1, 2, 2, 5, 16), (2, 4, 2, 33, 64), (1, 8, 2, 64, 128), (2, 3, 1, 17, 40)])
def test_ring_merge_and_grad_acc_equal_torch_ops(dtype, B, H, Hkv, S, D):
    need("ring_merge")
    from cuda_ops import ring
    from meshpar.ops.attention.block import merge_, reduce_kv

    gen = torch.Generator(device="cuda").manual_seed(5)
    sl = slice(S, 2 * S)  # into a strided view, as the ring merges into query-row slices
    out_acc = torch.randn(B, H, 2 * S, D, device="cuda", generator=gen)
    lse_acc = torch.randn(B, H, 2 * S, device="cuda", generator=gen) * 3
    o = torch.randn(B, H, S, D, device="cuda", generator=gen).to(dtype)
    lse = (torch.randn(B, H, S, 1, device="cuda", generator=gen) * 3).reshape(B, H, S)
    r_out, r_lse, k_out, k_lse = out_acc.clone(), lse_acc.clone(), out_acc.clone(), lse_acc.clone()
    merge_(r_out[:, :, sl], r_lse[:, :, sl], o, lse)
    assert ring.merge_applies(k_out[:, :, sl], k_lse[:, :, sl], o, lse)
    ring.merge_(k_out[:, :, sl], k_lse[:, :, sl], o, lse)
    torch.testing.assert_close(k_out, r_out, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(k_lse, r_lse, rtol=1e-6, atol=1e-6)

    rep = H // Hkv
    dq = torch.randn(B, H, 2 * S, D, device="cuda", generator=gen)
    dkv = torch.randn(2, B, Hkv, 2 * S, D, device="cuda", generator=gen)
    d_q, d_k, d_v = (torch.randn(B, H, S, D, device="cuda", generator=gen).to(dtype) for _ in range(3))
    ref_q, ref_kv = dq.clone(), dkv.clone()
    ref_q[:, :, sl] += d_q.float()
    ref_kv[0][:, :, sl] += reduce_kv(d_k.float(), rep)
    ref_kv[1][:, :, sl] += reduce_kv(d_v.float(), rep)
    kq, kkv = dq.clone(), dkv.clone()
    assert ring.grad_applies(kq[:, :, sl], d_q, kkv[0][:, :, sl], kkv[1][:, :, sl], d_k, d_v, rep)
    ring.grad_acc_(kq[:, :, sl], d_q, kkv[0][:, :, sl], kkv[1][:, :, sl], d_k, d_v, rep)
    torch.testing.assert_close(kq, ref_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kkv, ref_kv, rtol=1e-6, atol=1e-6)


def test_fused_loss_bf16_matches_float64():
    """The fused loss head on the GPU (compiled per-chunk pieces) against float64, with ignored tokens."""
    from meshpar.ops.fused_loss import fused_linear_cross_entropy

    gen = torch.Generator(device="cuda").manual_seed(6)
    N, C, V = 1000, 256, 5003
    x = (torch.randn(N, C, device="cuda", generator=gen) * 0.5).bfloat16()
    w = (torch.randn(V, C, device="cuda", generator=gen) * C ** -0.5).bfloat16()
    t = torch.randint(0, V, (N,), device="cuda", generator=gen)
    t[::5] = -100
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    ref = F.cross_entropy(xd @ wd.t(), t)
    ref.backward()
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fused_linear_cross_entropy(xa, wa, t, chunk_size=300)
    loss.backward()

    def rel(a, b):
        return float((a.double() - b).norm() / b.norm())
    assert rel(loss.detach(), ref.detach()) < 1e-3
    assert rel(xa.grad, xd.grad) < 1e-2 and rel(wa.grad, wd.grad) < 1e-2
