"""Build, check and time the cuda_ops CUDA kernels against their torch paths (eager and torch.compile).

    python bench/kernels.py            # on one GPU: builds, checks, times; table last; JSON to $OUT or bench/results
    python bench/kernels.py --smoke    # CPU: tiny sizes, torch paths only (checks the script itself)

For every kernel: first a check against its torch path on fresh random inputs (outputs poisoned with NaN
through the caching allocator first, several shapes and dtypes, forward and gradients); a kernel that
fails its check is reported FAILED and not timed. Then the median time (CUDA events) of the kernel,
the eager torch path and the compiled torch path, on activation-sized inputs, and the kernel's
achieved bandwidth (the fewest bytes it must move / its time). Targets (issue 15): dropout >= 5x the
torch path, ring merge / accumulation >= 2x, bias+GeLU and bias+dropout+residual >= 1.2x eager.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cuda_ops  # noqa: E402
from common import bench, rel_err, table, try_compile, write_results  # noqa: E402
from cuda_ops import bias_act as k_bias_act  # noqa: E402
from cuda_ops import dropout as k_dropout  # noqa: E402
from cuda_ops import ring as k_ring  # noqa: E402
from meshpar.ops.attention.block import merge_ as torch_merge_  # noqa: E402
from meshpar.ops.attention.block import reduce_kv  # noqa: E402
from meshpar.ops.dropout import keep_mask  # noqa: E402


def poison(dev: torch.device, nbytes: int) -> None:
    """Fill free cached memory with NaN bytes so that unwritten kernel outputs show up as NaN."""
    if dev.type == "cuda":
        t = torch.full((nbytes // 4 + 1,), float("nan"), device=dev)
        del t


def torch_dropout(x, offsets, p, seed, site):
    """meshpar.ops.dropout.dropout_local's torch path (the kernel switch bypassed)."""
    return x * keep_mask(x.shape, offsets, p, seed, site, x.device).to(x.dtype) * (1.0 / (1.0 - p))


def _grad(fn, *inputs, g):
    ins = [t.detach().clone().requires_grad_() if t is not None and t.is_floating_point() else t for t in inputs]
    out = fn(*ins)
    out.backward(g)
    return out.detach(), [None if t is None or not t.requires_grad else t.grad for t in ins]


# ----------------------------------------------------------------------------- checks


def check_dropout(dev, smoke, log):
    gen = torch.Generator(device=dev).manual_seed(11)
    shapes = [(3, 5, 7), (2, 16, 64), (4, 33, 8, 24), (1000,)] + ([] if smoke else [(4, 512, 1024)])
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for shape in shapes:
            x = torch.randn(shape, device=dev, generator=gen).to(dtype)
            offs = [int(torch.randint(0, 5000, (1,), generator=gen, device=dev)) for _ in shape]
            if len(shape) > 1:  # a zigzag-like dim: explicit global positions
                offs[1] = torch.randperm(shape[1] * 3, device=dev, generator=gen)[: shape[1]]
            p, seed, site = 0.1 + 0.3 * float(torch.rand((), generator=gen, device=dev)), 987654321987, 7
            g = torch.randn(shape, device=dev, generator=gen).to(dtype)
            ref, (rgx,) = _grad(lambda t: torch_dropout(t, offs, p, seed, site), x, g=g)
            poison(dev, x.numel() * 8)
            out, (gx,) = _grad(lambda t: k_dropout.hash_dropout(t, offs, p, seed, site), x, g=g)
            if not (torch.equal(out, ref) and torch.equal(gx, rgx)):
                return f"dropout mismatch {dtype} {shape}: {rel_err(out, ref):.3g} / grad {rel_err(gx, rgx):.3g}"
            # fused bias + dropout + residual
            b = torch.randn(shape[-1], device=dev, generator=gen).to(dtype)
            r = torch.randn(shape, device=dev, generator=gen).to(dtype)
            ref, rg = _grad(lambda t, bb, rr: rr + torch_dropout(t + bb, offs, p, seed, site), x, b, r, g=g)
            poison(dev, x.numel() * 8)
            out, kg = _grad(lambda t, bb, rr: k_dropout.bias_dropout_add(t, bb, rr, offs, p, seed, site), x, b, r, g=g)
            if not torch.equal(out, ref) or not torch.equal(kg[0], rg[0]) or not torch.equal(kg[2], rg[2]):
                return f"bias_dropout_add mismatch {dtype} {shape}: {rel_err(out, ref):.3g}"
            if rel_err(kg[1], rg[1]) > (1e-6 if dtype in (torch.float32, torch.float64) else 1e-2):
                return f"bias_dropout_add bias grad {dtype} {shape}: {rel_err(kg[1], rg[1]):.3g}"
    return None


def check_bias_gelu(dev, smoke, log):
    gen = torch.Generator(device=dev).manual_seed(12)
    shapes = [(3, 7), (5, 64), (2, 9, 24)] + ([] if smoke else [(4096, 4096)])
    for approx in ("none", "tanh"):
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            tol = {torch.float64: 1e-13, torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
            for shape in shapes:
                x = (torch.randn(shape, device=dev, generator=gen) * 3).to(dtype)
                b = torch.randn(shape[-1], device=dev, generator=gen).to(dtype)
                g = torch.randn(shape, device=dev, generator=gen).to(dtype)
                ref, rg = _grad(lambda t, bb: F.gelu(t + bb, approximate=approx), x, b, g=g)
                poison(dev, x.numel() * 8)
                out, kg = _grad(lambda t, bb: k_bias_act.bias_gelu(t, bb, approx), x, b, g=g)
                e = max(rel_err(out, ref), rel_err(kg[0], rg[0]), rel_err(kg[1], rg[1]))
                if not e <= tol:
                    return f"bias_gelu {approx} {dtype} {shape}: rel err {e:.3g} > {tol}"
    return None


def _ring_inputs(dev, gen, B, H, Hkv, S, D, dtype, S_full):
    out_acc = torch.randn(B, H, S_full, D, device=dev, generator=gen)
    lse_acc = torch.randn(B, H, S_full, device=dev, generator=gen) * 3
    o = torch.randn(B, H, S, D, device=dev, generator=gen).to(dtype)
    lse4 = torch.randn(B, H, S, 1, device=dev, generator=gen) * 3  # like cuDNN's [B, H, S, 1]
    return out_acc, lse_acc, o, lse4.reshape(B, H, S)


def check_ring(dev, smoke, log):
    gen = torch.Generator(device=dev).manual_seed(13)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for (B, H, Hkv, S, D) in [(1, 2, 2, 5, 16), (2, 4, 2, 33, 64), (1, 8, 2, 64, 128), (2, 3, 1, 17, 40)]:
            S_full = 2 * S
            out_acc, lse_acc, o, l = _ring_inputs(dev, gen, B, H, Hkv, S, D, dtype, S_full)
            sl = slice(S, 2 * S)  # merge into the second half (a strided view, as the ring's blk.q)
            r_out, r_lse = out_acc.clone(), lse_acc.clone()
            torch_merge_(r_out[:, :, sl], r_lse[:, :, sl], o, l)
            k_out, k_lse = out_acc.clone(), lse_acc.clone()
            k_ring.merge_(k_out[:, :, sl], k_lse[:, :, sl], o, l)
            e = max(rel_err(k_out, r_out), rel_err(k_lse, r_lse))
            if not e <= 2e-6:
                return f"ring merge {dtype} {(B, H, S, D)}: rel err {e:.3g}"
            rep = H // Hkv
            dq = torch.randn(B, H, S_full, D, device=dev, generator=gen)
            dkv = torch.randn(2, B, Hkv, S_full, D, device=dev, generator=gen)
            d_q = torch.randn(B, H, S, D, device=dev, generator=gen).to(dtype)
            d_k = torch.randn(B, H, S, D, device=dev, generator=gen).to(dtype)
            d_v = torch.randn(B, H, S, D, device=dev, generator=gen).to(dtype)
            ref_q, ref_kv = dq.clone(), dkv.clone()  # exact reference: GQA sum in fp32
            ref_q[:, :, sl] += d_q.float()
            ref_kv[0][:, :, sl] += reduce_kv(d_k.float(), rep)
            ref_kv[1][:, :, sl] += reduce_kv(d_v.float(), rep)
            kq, kkv = dq.clone(), dkv.clone()
            k_ring.grad_acc_(kq[:, :, sl], d_q, kkv[0][:, :, sl], kkv[1][:, :, sl], d_k, d_v, rep)
            e = max(rel_err(kq, ref_q), rel_err(kkv, ref_kv))
            if not e <= 1e-6:
                return f"ring grad acc {dtype} {(B, H, Hkv, S, D)}: rel err {e:.3g}"
    return None


# ----------------------------------------------------------------------------- timings


def time_all(dev, smoke, log) -> list[dict]:
    rows = []
    reps = 3 if smoke else 30
    gen = torch.Generator(device=dev).manual_seed(21)
    dt = torch.bfloat16

    def add(kernel, variant, fn, nbytes=None, base=None):
        try:
            r = bench(fn, dev, warmup=1 if smoke else 5, reps=reps)
        except Exception as e:  # noqa: BLE001
            log.append(f"{kernel}/{variant}: {type(e).__name__}: {e}")
            return None
        row = {"kernel": kernel, "variant": variant, "ms": r["ms"], "spread": r["spread"]}
        if nbytes:
            row["GB/s"] = nbytes / r["ms"] / 1e6
        rows.append(row)
        print("row:", row, flush=True)
        return r["ms"]

    deferred: list = []  # the torch.compile variants, timed last

    def speedups(kernel):
        ks = [r for r in rows if r["kernel"] == kernel]
        kern = next((r["ms"] for r in ks if r["variant"] == "kernel"), None)
        for r in ks:
            r["kernel_speedup"] = (r["ms"] / kern) if kern else ""

    # dropout: [8, 2048, 4096] bf16 (an activation of a 4096-wide model)
    shape = (2, 64, 256) if smoke else (8, 2048, 4096)
    x = torch.randn(shape, device=dev, generator=gen).to(dt)
    offs, p, seed = (0, 2048, 0), 0.1, 1234
    have = {n: cuda_ops.load(n) is not None for n in ("dropout", "bias_act", "ring_merge")}
    add("dropout fwd", "torch eager", lambda: torch_dropout(x, offs, p, seed, 3))
    def _compiled_1():  # after every eager/kernel row: an Inductor compile can take minutes
        cd = try_compile(lambda t: torch_dropout(t, offs, p, seed, 3), "dropout", log)
        if cd is not None and not smoke:
            add("dropout fwd", "torch compiled", lambda: cd(x))
    deferred.append(_compiled_1)
    if have["dropout"]:
        add("dropout fwd", "kernel", lambda: k_dropout.hash_dropout(x, offs, p, seed, 3), nbytes=2 * x.numel() * 2)
    speedups("dropout fwd")

    # bias + dropout + residual
    b = torch.randn(shape[-1], device=dev, generator=gen).to(dt)
    r_ = torch.randn(shape, device=dev, generator=gen).to(dt)

    def bda_eager(t, bb, rr):
        return rr + torch_dropout(t + bb, offs, p, seed, 3)
    add("bias+dropout+residual fwd", "torch eager", lambda: bda_eager(x, b, r_))
    def _compiled_2():  # after every eager/kernel row: an Inductor compile can take minutes
        cb = try_compile(bda_eager, "bias_dropout_add", log)
        if cb is not None and not smoke:
            add("bias+dropout+residual fwd", "torch compiled", lambda: cb(x, b, r_))
    deferred.append(_compiled_2)
    if have["dropout"]:
        add("bias+dropout+residual fwd", "kernel", lambda: k_dropout.bias_dropout_add(x, b, r_, offs, p, seed, 3),
            nbytes=3 * x.numel() * 2)
    speedups("bias+dropout+residual fwd")

    # bias + GeLU, forward + backward (an MLP's fc output: [16384, 16384] bf16)
    gshape = (256, 512) if smoke else (16384, 16384)
    xg = torch.randn(gshape, device=dev, generator=gen).to(dt).requires_grad_()
    bg = torch.randn(gshape[-1], device=dev, generator=gen).to(dt).requires_grad_()
    gg = torch.randn(gshape, device=dev, generator=gen).to(dt)

    def fb(fn):
        def run():
            out = fn(xg, bg)
            out.backward(gg)
            xg.grad = bg.grad = None
        return run
    add("bias+gelu fwd+bwd", "torch eager", fb(lambda t, bb: F.gelu(t + bb, approximate="tanh")))
    def _compiled_3():  # after every eager/kernel row: an Inductor compile can take minutes
        cg = try_compile(lambda t, bb: F.gelu(t + bb, approximate="tanh"), "bias_gelu", log)
        if cg is not None and not smoke:
            add("bias+gelu fwd+bwd", "torch compiled", fb(cg))
    deferred.append(_compiled_3)
    if have["bias_act"]:
        add("bias+gelu fwd+bwd", "kernel", fb(lambda t, bb: k_bias_act.bias_gelu(t, bb, "tanh")),
            nbytes=5 * xg.numel() * 2)
    speedups("bias+gelu fwd+bwd")

    # ring merge: one ring step of a [1, 32, 8192, 128] query block (bf16 block output, fp32 accumulators)
    B, H, S, D = (1, 2, 64, 64) if smoke else (1, 32, 8192, 128)
    out_acc, lse_acc, o, l = _ring_inputs(dev, gen, B, H, H, S, D, dt, S)
    add("ring merge", "torch eager", lambda: torch_merge_(out_acc, lse_acc, o, l))
    def _compiled_4():  # after every eager/kernel row: an Inductor compile can take minutes
        cm = try_compile(torch_merge_, "ring merge", log)
        if cm is not None and not smoke:
            add("ring merge", "torch compiled", lambda: cm(out_acc, lse_acc, o, l))
    deferred.append(_compiled_4)
    if have["ring_merge"]:
        add("ring merge", "kernel", lambda: k_ring.merge_(out_acc, lse_acc, o, l),
            nbytes=out_acc.numel() * (4 + 4 + 2) + lse_acc.numel() * 12)
    speedups("ring merge")

    # ring grad accumulation, MHA (rep 1) and GQA (rep 4)
    for rep in (1, 4):
        Hkv = H // rep if H % rep == 0 else H
        rep = H // Hkv
        dq = torch.randn(B, H, S, D, device=dev, generator=gen)
        dkv = torch.randn(2, B, Hkv, S, D, device=dev, generator=gen)
        d_q, d_k, d_v = (torch.randn(B, H, S, D, device=dev, generator=gen).to(dt) for _ in range(3))
        name = f"ring dq/dk/dv acc rep={rep}"

        def torch_acc(dq=dq, dkv=dkv, d_q=d_q, d_k=d_k, d_v=d_v, rep=rep):
            dq += d_q
            dkv[0] += reduce_kv(d_k, rep)
            dkv[1] += reduce_kv(d_v, rep)
        add(name, "torch eager", torch_acc)
        if have["ring_merge"]:
            add(name, "kernel", lambda dq=dq, dkv=dkv, d_q=d_q, d_k=d_k, d_v=d_v, rep=rep:
                k_ring.grad_acc_(dq, d_q, dkv[0], dkv[1], d_k, d_v, rep),
                nbytes=dq.numel() * 10 + dkv.numel() * 8 + 2 * d_k.numel() * 2)
        speedups(name)
    for fn in deferred:
        fn()
    for k in dict.fromkeys(r["kernel"] for r in rows):
        speedups(k)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU; torch paths only")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    log: list[str] = []
    status = {n: cuda_ops.status(n) for n in cuda_ops.KERNELS}
    for n, s in status.items():
        print(f"build {n:>12}: {s.state} ({s.reason})", flush=True)
    checks = {}
    if args.smoke:  # exercise the check harness on CPU with the torch paths standing in for the kernels
        k_dropout.hash_dropout = torch_dropout
        k_ring.merge_ = torch_merge_

        def acc(dq, d_q, dk, dv, d_k, d_v, rep):
            dq += d_q.float()
            dk += reduce_kv(d_k.float(), rep)
            dv += reduce_kv(d_v.float(), rep)
        k_ring.grad_acc_ = acc
        for name, fn in (("dropout", check_dropout), ("bias_gelu", check_bias_gelu), ("ring", check_ring)):
            err = fn(dev, True, log)
            checks[name] = "harness ok (torch paths)" if err is None else f"FAILED: {err}"
    if dev.type == "cuda":
        for name, fn, lib in (("dropout", check_dropout, "dropout"), ("bias_gelu", check_bias_gelu, "bias_act"),
                              ("ring", check_ring, "ring_merge")):
            if cuda_ops.load(lib) is None:
                checks[name] = f"not built: {status[lib].reason}"
                continue
            try:
                err = fn(dev, args.smoke, log)
            except Exception as e:  # noqa: BLE001
                err = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
            checks[name] = "ok" if err is None else f"FAILED: {err}"
            if err is not None:  # a failing kernel must not be timed or used: force its fallback
                os.environ["MESHPAR_DISABLE_KERNELS"] = ",".join(
                    filter(None, [os.environ.get("MESHPAR_DISABLE_KERNELS", ""), lib]))
            print(f"check {name}: {checks[name]}", flush=True)
    rows = time_all(dev, args.smoke, log)
    path = write_results("kernels" + ("_smoke" if args.smoke else ""), {
        "status": {n: [s.state, s.reason] for n, s in status.items()}, "checks": checks, "rows": rows,
        "log": log})
    for line in log:
        print("note:", line)
    print(f"results: {path}")
    print(table(rows, ["kernel", "variant", "ms", "spread", "GB/s", "kernel_speedup"]))
    print("checks:", checks)
    return 1 if any(v.startswith("FAILED") for v in checks.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
