"""Matmul benchmark (issue 3): SUMMA 2D on a 2×2 mesh vs ideal, DTensor and 1D, in one run.

Problems (bf16, C[M,N] = A[M,K]·B[K,N]): 8192³, 16384³ and M=K=32768, N=8192. For each:

* ``1gpu``           torch.mm of the whole problem on one device (gives ideal = t_1 / 4)
* ``summa2d``        meshpar, A P("x","y") @ B P("x","y") -> P("x","y") on mesh (x=2, y=2)
* ``dtensor2d``      DTensor, A [Shard(0),Shard(1)] @ B [Shard(0),Shard(1)] on a 2×2 DeviceMesh
* ``ours1d_col``     meshpar 1D column: A P() @ B P(None,"tp") on mesh (tp=4)
* ``dtensor1d_col``  DTensor: A Replicate @ B Shard(1)
* ``ours1d_row``     meshpar 1D row: A P(None,"tp") @ B P("tp",None), then reduced to replicated
* ``dtensor1d_row``  DTensor: A Shard(1) @ B Shard(0), then redistributed to Replicate

each for forward (``fwd``) and forward+backward (``fwdbwd``). Reported: the median of ``--iters``
timed runs after ``--warmup`` (CUDA events on GPU, max over ranks), TFLOP/s, and the ratio to
ideal ``(t_1 / 4) / t``. Every distributed result is checked once against the one-device result
before timing. JSON goes to ``bench/results/``.

GPU (4 GPUs)::

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
        torchrun --nproc-per-node 4 bench/matmul.py

CPU smoke test (spawns 4 gloo processes, tiny sizes; checks the script, not the speed)::

    python bench/matmul.py --smoke
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import meshpar as mp  # noqa: E402
from common import check, device, env_info, fwd_bwd, init_torchrun, spawn_smoke, time_fn, write_json  # noqa: E402

GPU_SIZES = [(8192, 8192, 8192), (16384, 16384, 16384), (32768, 32768, 8192)]
SMOKE_SIZES = [(64, 64, 64), (128, 64, 32)]


# ----------------------------------------------------------------------------- the benchmark
def _dtensor():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    return init_device_mesh, Replicate, Shard, distribute_tensor


def bench_size(m: int, k: int, n: int, args, meshes) -> list[dict]:
    dev, dt = device(), getattr(torch, args.dtype)
    mesh2, mesh1, dmesh2, dmesh1 = meshes
    _, Replicate, Shard, distribute_tensor = _dtensor()
    g = torch.Generator(device=dev).manual_seed(1234 + m + k + n)
    A = torch.randn(m, k, generator=g, device=dev, dtype=dt)
    B = torch.randn(k, n, generator=g, device=dev, dtype=dt)
    G = torch.randn(m, n, generator=g, device=dev, dtype=dt)
    ref = A @ B
    nw = dist.get_world_size()
    flops = 2.0 * m * n * k
    rows: list[dict] = []

    def leaf(t):
        return t.detach().requires_grad_()

    # name -> (forward builder returning (fn, result_to_check), leaves, grad_out)
    cases: dict[str, tuple] = {}
    A1, B1 = leaf(A), leaf(B)
    cases["1gpu"] = (lambda: A1 @ B1, lambda y: y, [A1, B1], G)
    a2, b2 = mp.shard(A, mp.P("x", "y"), mesh2).requires_grad_(), mp.shard(B, mp.P("x", "y"), mesh2).requires_grad_()
    cases["summa2d"] = (lambda: a2 @ b2, mp.unshard, [a2, b2], mp.shard(G, mp.P("x", "y"), mesh2))
    da, db = (distribute_tensor(leaf(t), dmesh2, [Shard(0), Shard(1)]) for t in (A, B))
    da, db = da.detach().requires_grad_(), db.detach().requires_grad_()
    cases["dtensor2d"] = (lambda: da @ db, lambda y: y.full_tensor(), [da, db],
                          distribute_tensor(G, dmesh2, [Shard(0), Shard(1)]))
    ac, bc = mp.shard(A, mp.P(), mesh1).requires_grad_(), mp.shard(B, mp.P(None, "tp"), mesh1).requires_grad_()
    cases["ours1d_col"] = (lambda: ac @ bc, mp.unshard, [ac, bc], mp.shard(G, mp.P(None, "tp"), mesh1))
    dac = distribute_tensor(A, dmesh1, [Replicate()]).requires_grad_()
    dbc = distribute_tensor(B, dmesh1, [Shard(1)]).requires_grad_()
    cases["dtensor1d_col"] = (lambda: dac @ dbc, lambda y: y.full_tensor(), [dac, dbc],
                              distribute_tensor(G, dmesh1, [Shard(1)]))
    ar, br = mp.shard(A, mp.P(None, "tp"), mesh1).requires_grad_(), mp.shard(B, mp.P("tp", None), mesh1).requires_grad_()
    cases["ours1d_row"] = (lambda: mp.reshard(ar @ br, mp.P()), mp.unshard, [ar, br], mp.shard(G, mp.P(), mesh1))
    dar = distribute_tensor(A, dmesh1, [Shard(1)]).requires_grad_()
    dbr = distribute_tensor(B, dmesh1, [Shard(0)]).requires_grad_()
    cases["dtensor1d_row"] = (lambda: (dar @ dbr).redistribute(dmesh1, [Replicate()]), lambda y: y.full_tensor(),
                              [dar, dbr], distribute_tensor(G, dmesh1, [Replicate()]))

    t1 = {}
    for name, (fwd, to_full, leaves, gout) in cases.items():
        with torch.no_grad():
            err = check(f"{name} {m}x{k}x{n}", to_full(fwd()), ref)
        for mode in ("fwd", "fwdbwd"):
            if mode == "fwd":
                def step(fwd=fwd):
                    with torch.no_grad():
                        fwd()
            else:
                step = fwd_bwd(fwd, leaves, gout)
            t = time_fn(step, args.warmup, args.iters)
            mult = 1.0 if mode == "fwd" else 3.0
            if name == "1gpu":
                t1[mode] = t
            ideal = t1[mode] / nw
            rows.append({"M": m, "K": k, "N": n, "case": name, "mode": mode, "time_s": t,
                         "tflops_per_gpu": mult * flops / t / 1e12 / (1 if name == "1gpu" else nw),
                         "ratio_to_ideal": ideal / t if name != "1gpu" else None, "rel_err": err})
    return rows


def run(args: argparse.Namespace) -> None:
    if dist.get_world_size() != 4:
        raise SystemExit("bench/matmul.py needs 4 ranks (a 2×2 mesh)")
    init_device_mesh = _dtensor()[0]
    dtype_dev = "cuda" if torch.cuda.is_available() else "cpu"
    meshes = (mp.Mesh((2, 2), ("x", "y")), mp.Mesh((4,), ("tp",)),
              init_device_mesh(dtype_dev, (2, 2), mesh_dim_names=("x", "y")),
              init_device_mesh(dtype_dev, (4,), mesh_dim_names=("tp",)))
    sizes = SMOKE_SIZES if args.smoke else GPU_SIZES
    rows = []
    for m, k, n in sizes:
        rows += bench_size(m, k, n, args, meshes)
    if dist.get_rank() == 0:
        print(f"{'M×K×N':>20} {'case':>14} {'mode':>7} {'time ms':>10} {'TFLOP/s/GPU':>12} {'× ideal':>8}")
        for r in rows:
            ratio = "" if r["ratio_to_ideal"] is None else f"{r['ratio_to_ideal']:.3f}"
            print(f"{r['M']}×{r['K']}×{r['N']:>6} {r['case']:>14} {r['mode']:>7} {1e3 * r['time_s']:>10.3f} "
                  f"{r['tflops_per_gpu']:>12.2f} {ratio:>8}")
        payload = {"bench": "matmul", **env_info(), "dtype": args.dtype, "warmup": args.warmup, "iters": args.iters,
                   "anchor": "DTensor 2x2 [Shard(0),Shard(1)] 16384^3 = 0.75 x ideal (docs anchors, 4xH100)",
                   "target": "SUMMA 2D fwd 16384^3 >= 0.90 x ideal", "smoke": args.smoke, "rows": rows}
        print("wrote", write_json("matmul_smoke" if args.smoke else "matmul", payload, args.out))


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="4 gloo CPU processes, tiny sizes")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/matmul_<date>.json)")
    a = p.parse_args(argv)
    if a.smoke:
        a.warmup, a.iters = 1, 3
        a.out = a.out or os.path.join("/tmp", "meshpar_matmul_smoke.json")
    return a


if __name__ == "__main__":
    args = parse()
    if args.smoke and "RANK" not in os.environ:
        spawn_smoke(run, args, 4)
    else:
        init_torchrun()
        try:
            run(args)
        finally:
            dist.destroy_process_group()
