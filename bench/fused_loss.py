"""Fused (chunked) linear + cross-entropy vs the unfused loss head: peak memory and time, forward + backward.

    python bench/fused_loss.py           # one GPU: 16K tokens, C = 2048, vocab 50,304 and 131,072, bf16
    python bench/fused_loss.py --smoke   # CPU, tiny sizes (checks the script)

Unfused = ``F.cross_entropy((x @ W.T).float(), t)`` then ``backward()`` (eager, and torch.compile of
the same function). Fused = ``meshpar.ops.fused_loss.fused_linear_cross_entropy``. First a check of
both against a float64 reference on a slice of the tokens (loss, dx, dW), then per vocabulary: the
head's peak memory (``max_memory_allocated`` during forward + backward minus what was allocated
before: x, W, targets) and the median time of forward + backward. Target (issue 15): fused peak
<= 0.25x unfused, time <= 1/0.95 of unfused eager.
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench, rel_err, table, try_compile, write_results  # noqa: E402
from meshpar.ops.fused_loss import default_chunk, fused_linear_cross_entropy  # noqa: E402


def unfused(x, w, t):
    return F.cross_entropy((x @ w.t()).float(), t, ignore_index=-100)


def fused(x, w, t, chunk=None):
    return fused_linear_cross_entropy(x, w, t, chunk_size=chunk)


def fwd_bwd(fn, x, w, t):
    def run():
        loss = fn(x, w, t)
        loss.backward()
        x.grad = w.grad = None
        return loss
    return run


def peak_bytes(fn, dev) -> int:
    if dev.type != "cuda":
        return 0
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def check(dev, dtype, N, C, V, log) -> dict:
    g = torch.Generator(device=dev).manual_seed(5)
    x = (torch.randn(N, C, device=dev, generator=g) * 0.5).to(dtype)
    w = (torch.randn(V, C, device=dev, generator=g) * C ** -0.5).to(dtype)
    t = torch.randint(0, V, (N,), device=dev, generator=g)
    t[::7] = -100
    res = {}
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    ref = F.cross_entropy(xd @ wd.t(), t)
    ref.backward()
    for name, fn in (("unfused", unfused), ("fused", lambda a, b, c: fused(a, b, c, chunk=max(1, N // 4)))):
        xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(xa, wa, t)
        loss.backward()
        res[name] = {"loss": rel_err(loss.detach(), ref.detach()), "dx": rel_err(xa.grad, xd.grad),
                     "dW": rel_err(wa.grad, wd.grad)}
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--vocabs", type=int, nargs="*", default=[50304, 131072])
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    N, C, vocabs = (256, 64, [1000]) if args.smoke else (args.tokens, args.hidden, args.vocabs)
    log: list[str] = []
    checks = check(dev, dtype, 2048 if not args.smoke else 128, C, vocabs[0], log)
    print("check vs float64 (relative errors):", checks, flush=True)
    ok = all(v <= 2e-2 for r in checks.values() for v in r.values())
    rows = []
    comp = try_compile(unfused, "unfused", log)
    for V in vocabs:
        g = torch.Generator(device=dev).manual_seed(V)
        x = (torch.randn(N, C, device=dev, generator=g) * 0.5).to(dtype).requires_grad_()
        w = (torch.randn(V, C, device=dev, generator=g) * C ** -0.5).to(dtype).requires_grad_()
        t = torch.randint(0, V, (N,), device=dev, generator=g)
        variants = [("unfused eager", unfused), ("fused (default chunk)", fused)]
        if comp is not None and not args.smoke:
            variants.insert(1, ("unfused compiled", comp))
        base_ms = base_mem = None
        for name, fn in variants:
            try:
                run = fwd_bwd(fn, x, w, t)
                run()  # warm (compile, cuBLAS handles)
                mem = peak_bytes(run, dev)
                r = bench(run, dev, warmup=2, reps=3 if args.smoke else 10)
            except Exception as e:  # noqa: BLE001
                log.append(f"V={V} {name}: {type(e).__name__}: {str(e)[:300]}")
                continue
            if name == "unfused eager":
                base_ms, base_mem = r["ms"], mem
            rows.append({"vocab": V, "variant": name, "ms": r["ms"], "spread": r["spread"], "peak_GiB": mem / 2 ** 30,
                         "speed_vs_eager": (base_ms / r["ms"]) if base_ms else "",
                         "mem_vs_eager": (mem / base_mem) if base_mem else "",
                         "chunk": default_chunk(N, V) if name.startswith("fused") else ""})
            print("row:", rows[-1], flush=True)
        del x, w, t
    path = write_results("fused_loss" + ("_smoke" if args.smoke else ""), {"checks": checks, "rows": rows,
                                                                             "log": log, "N": N, "C": C})
    for line in log:
        print("note:", line)
    print(f"results: {path}")
    print(table(rows, ["vocab", "variant", "ms", "spread", "peak_GiB", "speed_vs_eager", "mem_vs_eager", "chunk"]))
    print("checks ok:", ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
