"""8-GPU tensor-parallel benchmark (issue 8): 1D(8), 2D(2×2), 2.5D(2,2,2), 3D(2×2×2), and DTensor 1D.

Workload per hidden size h ∈ {8192, 16384, 32768} (bf16): two chained linears without bias,
``Z = (X·W1)·W2`` with X[b, s, h], W1, W2 [h, h], b·s = 8192 tokens (b=8, s=1024), forward and
forward+backward. Each mode uses its own specs; the second weight returns the activation to the
input layout:

======  =============  ==========================  ================================  ==========================
mode    mesh           X                           W1                                W2
======  =============  ==========================  ================================  ==========================
1d      (tp=8)         P()                         P(None, "tp")  (column)           P("tp", None) (row; Z reduced)
2d      (x=2, y=2)     P("x", None, "y")           P("x", "y")                       P("x", "y")   (4 GPUs only)
2.5d    (d=2,x=2,y=2)  P(("d","x"), None, "y")     P("x", "y")                       P("x", "y")
3d      (i=2,j=2,k=2)  P(("i","j"), None, "k")     P("k", ("j", "i"))                P("j", ("k", "i"))
======  =============  ==========================  ================================  ==========================

``dtensor1d`` is DTensor's Megatron MLP (ColwiseParallel then RowwiseParallel layouts) on 8 GPUs.
Ratio to ideal = (one-GPU time of the same problem / GPUs used) / time; the one-GPU time is
measured in the same run. Every result is checked against the one-device result before timing.
JSON goes to ``bench/results/``.

GPU::

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
        torchrun --nproc-per-node 8 bench/tp_8gpu.py

CPU smoke test (8 gloo processes, tiny sizes)::

    python bench/tp_8gpu.py --smoke
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import meshpar as mp  # noqa: E402
from common import (check, device, env_info, fwd_bwd, init_torchrun, spawn_smoke, time_fn,  # noqa: E402
                    write_json)

P = mp.P
MODES = {
    "1d": ((8,), ("tp",), P(), P(None, "tp"), P("tp", None)),
    "2d": ((2, 2), ("x", "y"), P("x", None, "y"), P("x", "y"), P("x", "y")),
    "2.5d": ((2, 2, 2), ("d", "x", "y"), P(("d", "x"), None, "y"), P("x", "y"), P("x", "y")),
    "3d": ((2, 2, 2), ("i", "j", "k"), P(("i", "j"), None, "k"), P("k", ("j", "i")), P("j", ("k", "i"))),
}


def bench_hidden(h: int, b: int, s: int, args, meshes: dict, dmesh) -> list[dict]:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    dev, dt = device(), getattr(torch, args.dtype)
    g = torch.Generator(device=dev).manual_seed(99 + h)
    X = torch.randn(b, s, h, generator=g, device=dev, dtype=dt)
    W1 = torch.randn(h, h, generator=g, device=dev, dtype=dt) / h ** 0.5
    W2 = torch.randn(h, h, generator=g, device=dev, dtype=dt) / h ** 0.5
    GZ = torch.randn(b, s, h, generator=g, device=dev, dtype=dt)
    ref = (X @ W1) @ W2
    flops = 2 * 2.0 * b * s * h * h
    rows = []

    def leaf(t):
        return t.detach().requires_grad_()

    cases: dict[str, tuple] = {}
    x1, a1, b1 = leaf(X), leaf(W1), leaf(W2)
    cases["1gpu"] = (1, lambda: (x1 @ a1) @ b1, lambda z: z, [x1, a1, b1], GZ)
    for name, mesh in meshes.items():
        if mesh is None or not mesh.contains_me:
            continue
        _, _, xs, w1s, w2s = MODES[name]
        x = mp.shard(X, xs, mesh).requires_grad_()
        w1 = mp.shard(W1, w1s, mesh).requires_grad_()
        w2 = mp.shard(W2, w2s, mesh).requires_grad_()
        if name == "1d":
            fwd = (lambda x=x, w1=w1, w2=w2: mp.reshard(x @ w1 @ w2, P()))
        else:
            fwd = (lambda x=x, w1=w1, w2=w2: (x @ w1) @ w2)
        cases[name] = (mesh.size(), fwd, mp.unshard, [x, w1, w2], mp.shard(GZ, xs, mesh))
    dx = distribute_tensor(X, dmesh, [Replicate()]).requires_grad_()
    dw1 = distribute_tensor(W1, dmesh, [Shard(1)]).requires_grad_()
    dw2 = distribute_tensor(W2, dmesh, [Shard(0)]).requires_grad_()
    cases["dtensor1d"] = (dist.get_world_size(), lambda: ((dx @ dw1) @ dw2).redistribute(dmesh, [Replicate()]),
                          lambda z: z.full_tensor(), [dx, dw1, dw2], distribute_tensor(GZ, dmesh, [Replicate()]))

    t1 = {}
    names = ["1gpu", "1d", "2d", "2.5d", "3d", "dtensor1d"]
    for name in names:
        # every rank takes part in every case (ranks outside a smaller mesh just wait), so barriers line up
        entry = cases.get(name)
        if entry is None:
            for mode in ("fwd", "fwdbwd"):
                time_fn(lambda: None, args.warmup, args.iters)
            continue
        ngpu, fwd, to_full, leaves, gout = entry
        with torch.no_grad():
            err = check(f"{name} h={h}", to_full(fwd()), ref)
        for mode in ("fwd", "fwdbwd"):
            if mode == "fwd":
                def step(fwd=fwd):
                    with torch.no_grad():
                        fwd()
            else:
                step = fwd_bwd(fwd, leaves, gout)
            t = time_fn(step, args.warmup, args.iters)
            if name == "1gpu":
                t1[mode] = t
            mult = 1.0 if mode == "fwd" else 3.0
            rows.append({"hidden": h, "tokens": b * s, "mode_tp": name, "pass": mode, "gpus": ngpu, "time_s": t,
                         "tflops_per_gpu": mult * flops / t / 1e12 / ngpu,
                         "ratio_to_ideal": None if name == "1gpu" else (t1[mode] / ngpu) / t, "rel_err": err})
    return rows


def run(args: argparse.Namespace) -> None:
    if dist.get_world_size() != 8:
        raise SystemExit("bench/tp_8gpu.py needs 8 ranks")
    from torch.distributed.device_mesh import init_device_mesh
    meshes = {name: mp.Mesh(shape, names) for name, (shape, names, *_rest) in MODES.items()}
    dmesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (8,), mesh_dim_names=("tp",))
    hiddens = [64, 128] if args.smoke else [8192, 16384, 32768]
    b, s = (8, 4) if args.smoke else (8, 1024)
    rows = []
    for h in hiddens:
        rows += bench_hidden(h, b, s, args, meshes, dmesh)
    if dist.get_rank() == 0:
        print(f"{'hidden':>7} {'mode':>10} {'pass':>7} {'gpus':>5} {'time ms':>10} {'TFLOP/s/GPU':>12} {'× ideal':>8}")
        for r in rows:
            ratio = "" if r["ratio_to_ideal"] is None else f"{r['ratio_to_ideal']:.3f}"
            print(f"{r['hidden']:>7} {r['mode_tp']:>10} {r['pass']:>7} {r['gpus']:>5} {1e3 * r['time_s']:>10.3f} "
                  f"{r['tflops_per_gpu']:>12.2f} {ratio:>8}")
        payload = {"bench": "tp_8gpu", **env_info(), "dtype": args.dtype, "warmup": args.warmup, "iters": args.iters,
                   "smoke": args.smoke, "rows": rows}
        print("wrote", write_json("tp_8gpu_smoke" if args.smoke else "tp_8gpu", payload, args.out))


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="8 gloo CPU processes, tiny sizes")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.smoke:
        a.warmup, a.iters = 1, 2
        a.out = a.out or os.path.join("/tmp", "meshpar_tp_8gpu_smoke.json")
    return a


if __name__ == "__main__":
    args = parse()
    if args.smoke and "RANK" not in os.environ:
        spawn_smoke(run, args, 8)
    else:
        init_torchrun()
        try:
            run(args)
        finally:
            dist.destroy_process_group()
