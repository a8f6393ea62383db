"""GPU (NCCL) versions of the core checks. Marked ``gpu``; they run on the device machine
(``make test-gpu``) and are skipped, with that reason, where no CUDA GPU is present.

* multi-GPU (>= 2): the core ops, SUMMA/1D matmuls and reshard on NCCL, one process per GPU;
* one GPU: the CUDA-only code paths -- the fused attention block kernels (flash, cudnn, efficient)
  with their log-sum-exp merge and FlashAttention-style backward, checked against float64; the
  same core script on a 1x1 NCCL mesh.

The core script (one process per GPU): matmul + reshard + pointwise ops, ring SDPA over "x"
(zigzag layout when x > 1) and a GPT step in the 2D plan, each against dense."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

NGPU = torch.cuda.device_count() if torch.cuda.is_available() else 0
needs_gpu = pytest.mark.skipif(NGPU < 1, reason="needs a CUDA GPU; run `make test-gpu` on the GPU machine")
needs_gpus = pytest.mark.skipif(NGPU < 2, reason=f"needs >= 2 CUDA GPUs with NCCL (found {NGPU}); "
                                                 "run `make test-gpu` on the GPU machine")

SCRIPT = r'''
import os, torch, torch.distributed as dist, meshpar as mp
from meshpar import P
dist.init_process_group("nccl")
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
n = dist.get_world_size()
mesh = mp.Mesh((2, n // 2), ("x", "y")) if n % 2 == 0 else mp.Mesh((n, 1), ("x", "y"))
dev = mesh.device
g = torch.Generator(device="cpu").manual_seed(0)
X = torch.randn(8 * n, 16 * n, dtype=torch.float64, generator=g).to(dev)
W = torch.randn(16 * n, 4 * n, dtype=torch.float64, generator=g).to(dev)
names = mesh.names
xs = mp.shard(X, P(names[0], names[-1]), mesh).requires_grad_()
ws = mp.shard(W, P(names[-1], None), mesh).requires_grad_()
y = xs @ ws
(mp.unshard(y) ** 2).sum().backward()
Xr, Wr = X.clone().requires_grad_(), W.clone().requires_grad_()
((Xr @ Wr) ** 2).sum().backward()
assert torch.allclose(mp.unshard(y), Xr @ Wr)
assert torch.allclose(mp.unshard(xs.grad), Xr.grad) and torch.allclose(mp.unshard(ws.grad), Wr.grad)
z = mp.reshard(y, P(None, names[0]))
assert torch.allclose(mp.unshard(z), Xr @ Wr)
for fn in (torch.tanh, lambda t: t.sum(0), lambda t: t * 2 + 1):
    assert torch.allclose(mp.unshard(fn(xs)), fn(X))
assert torch.allclose(mp.unshard(mp.reshard(xs, P(names[0], None)).softmax(-1)), X.softmax(-1))
if True:  # ring SDPA over "x" (balanced zigzag layout when x > 1; fused CUDA blocks), GPT in the 2D plan
    import torch.nn.functional as F
    gen = torch.Generator(device=dev).manual_seed(1)
    S = 128 * mesh.size("x")  # divisible by the 2*x zigzag chunks
    Q, K, V, G = (torch.randn(1, 4, S, 64, device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(4))
    seq = mp.Zigzag("x") if mesh.size("x") > 1 else "x"
    qs, ks, vs = (mp.shard(t, P(None, None, seq, None), mesh).requires_grad_() for t in (Q, K, V))
    o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
    o.backward(mp.shard(G, P(None, None, seq, None), mesh))
    qr, kr, vr = (t.double().requires_grad_() for t in (Q, K, V))
    orf = F.scaled_dot_product_attention(qr, kr, vr, is_causal=True)
    orf.backward(G.double())
    rel = lambda a, b: float((a.double() - b).norm() / b.norm())
    assert rel(mp.unshard(o), orf) < 2e-2, rel(mp.unshard(o), orf)
    for a, b in ((qs, qr), (ks, kr), (vs, vr)):
        assert rel(mp.unshard(a.grad), b.grad) < 3e-2, rel(mp.unshard(a.grad), b.grad)
if mesh.size("x") == mesh.size("y"):  # the 2D plan needs a square grid
    import copy
    from meshpar.models.gpt import GPT, GPTConfig
    from meshpar.models.plans import parallel_plan
    cfg = GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=4, n_embd=32)
    idx = torch.randint(0, 40, (2, 16), device=dev, generator=gen)
    dense = GPT(cfg, dtype=torch.float64).to(dev)
    sharded = mp.parallelize(copy.deepcopy(dense), mesh, parallel_plan("gpt", "2d"))
    ld = dense(idx, idx)
    ld.backward()
    ls = mp.unshard(sharded(idx, idx))
    ls.backward()
    assert abs(float(ls) - float(ld)) < 1e-9 * abs(float(ld)), (float(ls), float(ld))
    dp = dict(dense.named_parameters())
    for k, t in sharded.named_parameters():
        assert torch.allclose(mp.unshard(t.grad), dp[k].grad, rtol=1e-7, atol=1e-10), k
if dist.get_rank() == 0:
    print("GPU CORE OK", n)
dist.destroy_process_group()
'''


def _run_script(tmp_path, nproc: int) -> None:
    f = tmp_path / "gpu_core.py"
    f.write_text(SCRIPT)
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          f"--nproc-per-node={nproc}", str(f)], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "GPU CORE OK" in out.stdout


@pytest.mark.gpu
@needs_gpus
def test_core_on_nccl(tmp_path):
    _run_script(tmp_path, NGPU)


@pytest.mark.gpu
@needs_gpu
def test_core_on_nccl_one_gpu(tmp_path):
    """World size 1 on NCCL: CUDA placement of every path, ring SDPA with flash blocks, GPT 2D plan."""
    _run_script(tmp_path, 1)


MODULE_PLANS = ["dp", "1d", "2d", "2.5d", "3d"]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("mode", MODULE_PLANS)
def test_module_path_one_gpu_equals_dense_without_host_sync(mode):
    """meshpar's plain GPT in each plan (size-1 axes), moved to the GPU by ``initialize``: three fp32
    engine steps equal the dense plan's (losses and parameters), bf16 trains, and two bf16 steps run
    under ``torch.cuda.set_sync_debug_mode("error")`` (no host sync). Runs from a checkout: the
    subprocess gets it on ``PYTHONPATH``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
               NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    env.pop("RANK", None)
    out = subprocess.run([sys.executable, os.path.join(root, "tests", "gpu_module_script.py"), mode, "error"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-6000:]
    assert f"MODULE OK {mode}" in out.stdout


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm())


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("impl,dtype", [("flash", torch.bfloat16), ("flash", torch.float16),
                                        ("efficient", torch.float32), ("math", torch.bfloat16),
                                        ("cudnn", torch.bfloat16)])
@pytest.mark.parametrize("causal", [False, True])
def test_fused_cuda_blocks_merge_equal_float64(impl, dtype, causal):
    """The ring's per-block CUDA kernels: 4 query/key blocks in the zigzag causal pattern (diagonal
    blocks causal, blocks below full), merged by log-sum-exp and differentiated with the final
    out/lse, equal float64 dense attention (forward, lse, dQ/dK/dV)."""
    from meshpar.ops.attention.block import block_backward, block_forward, merge_

    g = torch.Generator(device="cuda").manual_seed(7)
    B, H, S, D, n = 2, 4, 512, 64, 4
    Q, K, V, dO = (torch.randn(B, H, S, D, device="cuda", dtype=dtype, generator=g) for _ in range(4))
    scale = D ** -0.5
    q64, k64, v64 = (t.double().requires_grad_() for t in (Q, K, V))
    ref = torch.nn.functional.scaled_dot_product_attention(q64, k64, v64, is_causal=causal, scale=scale)
    ref.backward(dO.double())
    s64 = (q64 @ k64.transpose(-1, -2)).detach() * scale
    if causal:
        s64 = s64.masked_fill(torch.ones(S, S, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
    ref_lse = torch.logsumexp(s64, -1)
    blk = S // n
    sl = [slice(i * blk, (i + 1) * blk) for i in range(n)]
    pairs = [(i, j) for i in range(n) for j in range(n) if not causal or j <= i]
    out = torch.zeros(B, H, S, D, device="cuda", dtype=torch.float32)
    lse = torch.full((B, H, S), float("-inf"), device="cuda", dtype=torch.float32)
    metas = {}
    for i, j in pairs:
        o, l, m = block_forward(Q[:, :, sl[i]], K[:, :, sl[j]], V[:, :, sl[j]], causal=causal and i == j,
                                scale=scale, impl=impl)
        metas[i, j] = m
        merge_(out[:, :, sl[i]], lse[:, :, sl[i]], o, l)
    tol = 5e-3 if dtype == torch.float32 else 2e-2
    assert _rel(out, ref.detach()) < tol
    assert _rel(lse, ref_lse) < 1e-3
    dq, dk, dv = (torch.zeros(B, H, S, D, device="cuda", dtype=torch.float32) for _ in range(3))
    o_fin = out.to(dtype)
    for i, j in pairs:
        a, b, c = block_backward(dO[:, :, sl[i]], Q[:, :, sl[i]], K[:, :, sl[j]], V[:, :, sl[j]], o_fin[:, :, sl[i]],
                                 lse[:, :, sl[i]], causal=causal and i == j, scale=scale, impl=impl,
                                 meta=metas[i, j])
        dq[:, :, sl[i]] += a.float()
        dk[:, :, sl[j]] += b.float()
        dv[:, :, sl[j]] += c.float()
    for got, r, name in ((dq, q64.grad, "dq"), (dk, k64.grad, "dk"), (dv, v64.grad, "dv")):
        assert _rel(got, r) < 2 * tol, (name, _rel(got, r))
