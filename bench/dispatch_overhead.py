"""Per-op eager dispatch overhead: meshpar vs DTensor, same ops and layouts, same run (issue 2).

Two gloo ranks on the CPU, a 1-D mesh ("x", 2). Each op runs on small tensors split on dim 0
(``P("x")`` / ``[Shard(0)]``) with replicated second operands, so no op communicates and the time is
the framework's own cost. Overhead = median time of the sharded op − median time of the same op on
the plain local block. Reported: per-op overheads (µs) and the ratio meshpar/DTensor (target ≤ 0.5);
for reference (not in the ratios) the overhead of a bare ``__torch_function__`` wrapper subclass on
add, the floor of a Python-level wrapper design.

    torchrun --nproc-per-node 2 bench/dispatch_overhead.py            # writes bench/results/dispatch_overhead.json
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import meshpar as mp  # noqa: E402
from meshpar import P  # noqa: E402


def med_us(fn, n: int = 300, reps: int = 7) -> float:
    for _ in range(30):
        fn()
    meds = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        meds.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(meds)


class _Bare(torch.Tensor):
    """The floor of the ``__torch_function__`` design: a wrapper subclass that only unwraps, runs the op
    on the block and rewraps (no layouts, no rules). Reported for reference; not part of the ratios."""

    @staticmethod
    def __new__(cls, local, shape):
        r = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=local.dtype, device=local.device)
        r._local, r._gs = local, shape
        return r

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return _Bare(func(args[0]._local, args[1]._local), args[0]._gs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(func)


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = mp.Mesh((2,), ("x",))
    dmesh = init_device_mesh("cpu", (2,), mesh_dim_names=("x",))
    torch.manual_seed(0)
    X = torch.randn(16, 32)
    B = torch.randn(32)
    W = torch.randn(32, 32)
    xs = mp.shard(X, P("x"), mesh)
    bs = mp.shard(B, P(), mesh)
    ws = mp.shard(W, P(), mesh)
    xd = distribute_tensor(X, dmesh, [Shard(0)])
    bd = distribute_tensor(B, dmesh, [Replicate()])
    wd = distribute_tensor(W, dmesh, [Replicate()])
    xl, bl, wl = xs._local, B, W

    ops = {
        "add": (lambda x, b, w: x + x),
        "mul_bcast": (lambda x, b, w: x * b),
        "relu": (lambda x, b, w: torch.relu(x)),
        "gelu": (lambda x, b, w: torch.nn.functional.gelu(x)),
        "transpose": (lambda x, b, w: x.transpose(0, 1)),
        "reshape": (lambda x, b, w: x.reshape(-1, 4, 8)),
        "sum_dim1": (lambda x, b, w: x.sum(dim=1)),
        "matmul": (lambda x, b, w: x @ w),
        "linear": (lambda x, b, w: torch.nn.functional.linear(x, w, b)),
        "softmax": (lambda x, b, w: torch.softmax(x, dim=-1)),
    }
    # check once that both frameworks compute the dense result
    for name, f in ops.items():
        ref = f(X, B, W)
        got = mp.unshard(f(xs, bs, ws))
        dt = f(xd, bd, wd).full_tensor()
        assert torch.allclose(got, ref, atol=1e-5) and torch.allclose(dt, ref, atol=1e-5), name
    rows = []
    with torch.no_grad():
        for name, f in ops.items():
            t_local = med_us(lambda: f(xl, bl, wl))
            t_mp = med_us(lambda: f(xs, bs, ws))
            t_dt = med_us(lambda: f(xd, bd, wd))
            rows.append(dict(op=name, local_us=t_local, meshpar_us=t_mp, dtensor_us=t_dt,
                             meshpar_overhead_us=t_mp - t_local, dtensor_overhead_us=t_dt - t_local))
        xb = _Bare(xl, tuple(X.shape))
        floor_add_us = med_us(lambda: xb + xb) - med_us(lambda: xl + xl)
    ratio = statistics.median(r["meshpar_overhead_us"] / r["dtensor_overhead_us"] for r in rows)
    total_ratio = sum(r["meshpar_overhead_us"] for r in rows) / sum(r["dtensor_overhead_us"] for r in rows)
    # max over ranks of the two summary ratios
    t = torch.tensor([ratio, total_ratio], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        print(f"{'op':12s} {'local µs':>9s} {'meshpar µs':>11s} {'DTensor µs':>11s} {'ovh ratio':>10s}")
        for r in rows:
            print(f"{r['op']:12s} {r['local_us']:9.1f} {r['meshpar_us']:11.1f} {r['dtensor_us']:11.1f} "
                  f"{r['meshpar_overhead_us'] / r['dtensor_overhead_us']:10.2f}")
        print(f"median per-op overhead ratio meshpar/DTensor: {t[0]:.2f} ; total-overhead ratio: {t[1]:.2f} "
              "(target <= 0.5)")
        print(f"reference: a bare __torch_function__ wrapper (unwrap, op, rewrap) costs {floor_add_us:.1f} µs "
              "over the local op on add (rank 0)")
        out = dict(bench="dispatch_overhead", date=datetime.date.today().isoformat(), device="cpu",
                   host=platform.processor() or platform.machine(), torch=torch.__version__, backend="gloo",
                   world=2, rows=rows, median_overhead_ratio=float(t[0]), total_overhead_ratio=float(t[1]),
                   bare_wrapper_add_overhead_us=floor_add_us)
        os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
        with open(os.path.join(os.path.dirname(__file__), "results", "dispatch_overhead.json"), "w") as fh:
            json.dump(out, fh, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
