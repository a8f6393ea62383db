"""Per-block attention kernels of the ring (one GPU): which fused kernel to use, and how fast.

    python bench/attention_blocks.py            # on a CUDA GPU
    python bench/attention_blocks.py --smoke    # CPU: only the math / cpu_fused check, tiny sizes

For each kernel of :mod:`meshpar.ops.attention.block` that runs on this device: first a check
(4 x 4 blocks merged by log-sum-exp, differentiated with the merged out/LSE, against the
``math`` kernel on float32 copies of the same inputs), then the median time of ``block_forward``
and ``block_backward`` on one ``--seq`` x ``--seq`` block (B1, H32, D128, bf16, causal and not).
Results are printed and written to ``bench/results/attention_blocks-<time>.json``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from meshpar.ops.attention.block import block_backward, block_forward, merge_  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def check(impl: str, dtype: torch.dtype, device: str) -> list[float]:
    """Max relative error of (out, dq, dk, dv) of 4x4 merged blocks against ``math`` in float32."""
    B, H, S, D, n = 2, 4, 512, 64, 4
    g = torch.Generator(device=device).manual_seed(0)
    Q, K, V, dO = (torch.randn(B, H, S, D, device=device, dtype=dtype, generator=g) for _ in range(4))
    sl = [slice(i * S // n, (i + 1) * S // n) for i in range(n)]
    sc = D ** -0.5
    res = {}
    for name, dt in ((impl, dtype), ("math", torch.float32)):
        q, k, v, do = (t.to(dt) for t in (Q, K, V, dO))
        out = torch.zeros(B, H, S, D, device=device)
        lse = torch.full((B, H, S), float("-inf"), device=device)
        metas = {}
        for i in range(n):
            for j in range(n):
                o, l, metas[i, j] = block_forward(q[:, :, sl[i]], k[:, :, sl[j]], v[:, :, sl[j]], causal=False,
                                                  scale=sc, impl=name)
                merge_(out[:, :, sl[i]], lse[:, :, sl[i]], o, l)
        grads = [torch.zeros(B, H, S, D, device=device) for _ in range(3)]
        for i in range(n):
            for j in range(n):
                a, b, c = block_backward(do[:, :, sl[i]], q[:, :, sl[i]], k[:, :, sl[j]], v[:, :, sl[j]],
                                         out[:, :, sl[i]].to(dt), lse[:, :, sl[i]], causal=False, scale=sc,
                                         impl=name, meta=metas[i, j])
                grads[0][:, :, sl[i]] += a.float()
                grads[1][:, :, sl[j]] += b.float()
                grads[2][:, :, sl[j]] += c.float()
        res[name] = [out] + grads
    return [rel(a, b) for a, b in zip(res[impl], res["math"])]


def time_block(impl: str, s: int, causal: bool, device: str, iters: int) -> tuple[float, float]:
    """Median ms of block_forward and block_backward on one [1, 32, s, 128] bf16 block."""
    q, k, v, do = (torch.randn(1, 32, s, 128, device=device, dtype=torch.bfloat16) for _ in range(4))
    sc = 128 ** -0.5
    o, l, m = block_forward(q, k, v, causal=causal, scale=sc, impl=impl)

    def med(fn) -> float:
        fn()
        ts = []
        for _ in range(iters):
            if device == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                ts.append(a.elapsed_time(b))
            else:
                t = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t) * 1e3)
        return statistics.median(ts)
    fwd = med(lambda: block_forward(q, k, v, causal=causal, scale=sc, impl=impl))
    bwd = med(lambda: block_backward(do, q, k, v, o, l, causal=causal, scale=sc, impl=impl, meta=m))
    return fwd, bwd


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    impls = [("flash", torch.bfloat16), ("cudnn", torch.bfloat16), ("efficient", torch.float32)] if cuda else \
        [("cpu_fused", torch.float32)]
    rows = []
    for impl, dt in impls:
        row = {"impl": impl, "check_dtype": str(dt)}
        try:
            row["rel_err_out_dq_dk_dv_vs_math"] = check(impl, dt, device)
            if dt == torch.bfloat16:
                for causal in (True, False):
                    f, b = time_block(impl, args.seq if cuda else 256, causal, device, args.iters)
                    row[f"{'causal' if causal else 'full'}_fwd_ms"], row[f"{'causal' if causal else 'full'}_bwd_ms"] = f, b
        except Exception as e:  # a kernel this device/torch lacks is reported, not fatal
            row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        rows.append(row)
        print(json.dumps(row), flush=True)
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if cuda else "cpu (smoke)", "seq": args.seq, "rows": rows}
    out = Path(args.out or ("/tmp/meshpar-bench-smoke" if args.smoke else ROOT / "bench" / "results"))
    out.mkdir(parents=True, exist_ok=True)
    f = out / f"attention_blocks-{'smoke-' if args.smoke else ''}{int(time.time())}.json"
    f.write_text(json.dumps(info, indent=1))
    print("wrote", f)


if __name__ == "__main__":
    main()
