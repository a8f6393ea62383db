"""Per-op eager dispatch overhead: meshpar vs DTensor, same ops and layouts, same run (issue 2).

Two gloo ranks on the CPU, a 1-D mesh ("x", 2). Each op runs on small tensors split on dim 0
(``P("x")`` / ``[Shard(0)]``) with replicated second operands, so no op communicates and the time is
the framework's own cost. Overhead = median time of the sharded op − median time of the same op on
the plain local block. Reported: per-op overheads (µs) and the ratio meshpar/DTensor (target ≤ 0.5);
for reference (not in the ratios) the overhead of a bare ``__torch_function__`` wrapper subclass on
add, the floor of a Python-level wrapper design.

Both paths are reported: under ``torch.no_grad()``, and with autograd on (inputs that require grad;
forward only), plus forward+backward of a small chain (linear, gelu, scale+add, softmax, mul, sum).

    torchrun --nproc-per-node 2 bench/dispatch_overhead.py            # writes bench/results/dispatch_overhead.json
    torchrun --nproc-per-node 2 bench/dispatch_overhead.py --smoke    # a few seconds, nothing written
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


SMOKE = "--smoke" in sys.argv


def med_us(fn, n: int = 300, reps: int = 7) -> float:
    for _ in range(10 if SMOKE else 30):
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
    n = 60 if SMOKE else 300
    reps = 3 if SMOKE else 7

    def measure(mode: str) -> list[dict]:
        """Per-op times. ``nograd``: under torch.no_grad; ``grad``: inputs require grad (forward only)."""
        rows = []
        if mode == "nograd":
            xa, ba, wa = (xs, bs, ws), (xd, bd, wd), (xl, bl, wl)
        else:
            xa = tuple(t.detach().requires_grad_() for t in (xs, bs, ws))
            ba = tuple(t.detach().requires_grad_() for t in (xd, bd, wd))
            wa = tuple(t.detach().requires_grad_() for t in (xl, bl, wl))
        ctx = torch.no_grad() if mode == "nograd" else torch.enable_grad()
        with ctx:
            for name, f in ops.items():
                t_local = med_us(lambda: f(*wa), n, reps)
                t_mp = med_us(lambda: f(*xa), n, reps)
                t_dt = med_us(lambda: f(*ba), n, reps)
                rows.append(dict(op=name, local_us=t_local, meshpar_us=t_mp, dtensor_us=t_dt,
                                 meshpar_overhead_us=t_mp - t_local, dtensor_overhead_us=t_dt - t_local))
        return rows

    def chain(x, b, w):
        h = torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b))
        return (torch.softmax(h * 2.0 + x, dim=-1) * x).sum()

    def fwd_bwd(args):
        def run():
            for t in args:
                t.grad = None
            chain(*args).backward()
        return run

    rows_ng = measure("nograd")
    rows_g = measure("grad")
    ch_local = med_us(fwd_bwd(tuple(t.detach().requires_grad_() for t in (xl, bl, wl))), n // 3, reps)
    ch_mp = med_us(fwd_bwd(tuple(t.detach().requires_grad_() for t in (xs, bs, ws))), n // 3, reps)
    ch_dt = med_us(fwd_bwd(tuple(t.detach().requires_grad_() for t in (xd, bd, wd))), n // 3, reps)
    # DTensor leaves the replicated w and b with Partial gradients (no all-reduce in the backward); meshpar
    # reduces them by default (a gradient has its value's layout). The same work as DTensor: w and b defer
    # their sum over "x" (grads come back unreduced), as a data-parallel reducer's parameters do.
    xp, bp, wp = (t.detach().requires_grad_() for t in (xs, bs, ws))
    bp._meshpar_defer_reduce = wp._meshpar_defer_reduce = ("x",)
    ch_mp_partial = med_us(fwd_bwd((xp, bp, wp)), n // 3, reps)
    with torch.no_grad():
        xb = _Bare(xl, tuple(X.shape))
        floor_add_us = med_us(lambda: xb + xb, n, reps) - med_us(lambda: xl + xl, n, reps)

    def ratios(rows):
        med = statistics.median(r["meshpar_overhead_us"] / r["dtensor_overhead_us"] for r in rows)
        tot = sum(r["meshpar_overhead_us"] for r in rows) / sum(r["dtensor_overhead_us"] for r in rows)
        return med, tot
    m_ng, t_ng = ratios(rows_ng)
    m_g, t_g = ratios(rows_g)
    ch_ratio = (ch_mp - ch_local) / (ch_dt - ch_local)
    ch_ratio_partial = (ch_mp_partial - ch_local) / (ch_dt - ch_local)
    # max over ranks of the summary ratios
    t = torch.tensor([m_ng, t_ng, m_g, t_g, ch_ratio, ch_ratio_partial], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        for title, rows in (("no-grad", rows_ng), ("autograd on (inputs require grad, forward)", rows_g)):
            print(f"-- {title}")
            print(f"{'op':12s} {'local µs':>9s} {'meshpar µs':>11s} {'DTensor µs':>11s} {'ovh ratio':>10s}")
            for r in rows:
                print(f"{r['op']:12s} {r['local_us']:9.1f} {r['meshpar_us']:11.1f} {r['dtensor_us']:11.1f} "
                      f"{r['meshpar_overhead_us'] / r['dtensor_overhead_us']:10.2f}")
        print(f"no-grad : median per-op overhead ratio meshpar/DTensor {t[0]:.2f} ; total-overhead ratio {t[1]:.2f}")
        print(f"autograd: median per-op overhead ratio meshpar/DTensor {t[2]:.2f} ; total-overhead ratio {t[3]:.2f}")
        print(f"fwd+bwd chain (linear, gelu, scale+add, softmax, mul, sum; backward): local {ch_local:.0f} µs, "
              f"meshpar {ch_mp:.0f} µs, DTensor {ch_dt:.0f} µs; overhead ratio {t[4]:.2f}   (targets <= 0.5)")
        print(f"  the same with w, b gradients left partial as DTensor leaves them: meshpar {ch_mp_partial:.0f} µs; "
              f"overhead ratio {t[5]:.2f}")
        print(f"reference: a bare __torch_function__ wrapper (unwrap, op, rewrap) costs {floor_add_us:.1f} µs "
              "over the local op on add (rank 0)")
        out = dict(bench="dispatch_overhead", date=datetime.date.today().isoformat(), device="cpu",
                   host=platform.processor() or platform.machine(), torch=torch.__version__, backend="gloo",
                   world=2, smoke=SMOKE, rows=rows_ng, rows_autograd=rows_g,
                   median_overhead_ratio=float(t[0]), total_overhead_ratio=float(t[1]),
                   autograd_median_overhead_ratio=float(t[2]), autograd_total_overhead_ratio=float(t[3]),
                   chain_fwd_bwd_us=dict(local=ch_local, meshpar=ch_mp, dtensor=ch_dt),
                   chain_fwd_bwd_overhead_ratio=float(t[4]), chain_partial_grads_us=ch_mp_partial,
                   chain_partial_grads_overhead_ratio=float(t[5]), bare_wrapper_add_overhead_us=floor_add_us)
        if not SMOKE:
            os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
            with open(os.path.join(os.path.dirname(__file__), "results", "dispatch_overhead.json"), "w") as fh:
                json.dump(out, fh, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
