"""Longest sequence a GPT layer stack trains on N GPUs, with and without sequence parallelism.

    # on the GPU machine (the driver launches one torchrun per length and stops at the first failure):
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    python bench/max_seq.py --nproc 4 --modes dense,sp      # 4 GPUs: no SP (data parallel) vs ring SP
    python bench/max_seq.py --nproc 1 --modes dense          # one GPU: the no-SP figure
    # CPU smoke test of the script (gloo, tiny model, two lengths):
    python bench/max_seq.py --smoke

Modes, one training step each (forward, backward, AdamW step; bf16 compute, fp32 master weights):

* ``dense``: every rank holds the whole sequence (``parallel.data = nproc``, one sequence per
  rank). Without sequence parallelism this is the most a rank can hold: data parallelism does not
  shrink a rank's activations.
* ``sp``: the sequence is split over all ranks (``parallel.sequence = nproc``, ring attention,
  balanced causal layout), one sequence in all.

For each mode the lengths ``--start``, 2x, 4x, ... up to ``--max`` are tried, each in a fresh
``torchrun`` with a timeout, until one fails (out of memory, or the timeout); the longest that
trained is reported, with the peak memory per rank and the step time of a second, timed step.
Model default: the ~1.2B GPT of ``bench/gpt.py`` (24 layers, d=2048, 16 heads, vocab 50304).
JSON goes to ``bench/results/max_seq-<n>gpu-<time>.json``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(args: argparse.Namespace) -> None:
    """One training step (plus a timed second one) at ``args.seq``; prints a RESULT line on rank 0."""
    import torch
    import torch.distributed as dist

    import meshpar as mp
    import meshpar.train as mt
    from meshpar.models.gpt import GPT, GPTConfig

    use_cuda = torch.cuda.is_available() and not args.smoke
    if use_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=args.timeout))
    world = dist.get_world_size()
    par = dict(data=world) if args.mode == "dense" else dict(data=1, sequence=dict(size=world, mode="ring"))
    cfg = dict(parallel=par, precision="fp32" if args.smoke else "bf16", seed=0)
    ctx = mt.context_for(cfg)
    gcfg = GPTConfig(vocab_size=args.vocab, block_size=args.seq, n_layer=args.n_layer, n_head=args.n_head,
                     n_embd=args.n_embd)
    model = mt.parallelize_model(GPT(gcfg, seed=0), ctx).to(ctx.device)
    engine, *_ = mt.initialize(model, torch.optim.AdamW(model.parameters(), lr=1e-4), None, ctx=ctx)
    g = torch.Generator().manual_seed(1 + ctx.mesh.coord("data"))
    t = torch.randint(0, args.vocab, (1, args.seq + 1), generator=g)
    x, y = t[:, :-1].to(ctx.device), t[:, 1:].to(ctx.device)

    def step() -> float:
        engine.zero_grad()
        loss = engine(x, y)  # a ShardedTensor scalar (P()) under a plan
        loss = mp.unshard(loss) if isinstance(loss, mp.ShardedTensor) else loss
        engine.backward(loss)
        engine.step()
        return float(loss.detach())

    try:
        loss = step()
        if use_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if use_cuda:
            torch.cuda.synchronize()
        sec = time.perf_counter() - t0
    except torch.OutOfMemoryError as e:
        print(f"RANK{dist.get_rank()} OOM {str(e).splitlines()[0][:200]}", flush=True)
        os._exit(3)  # peers may wait in a collective: the driver's timeout ends them
    peak = torch.cuda.max_memory_allocated() / 2**30 if use_cuda else 0.0
    v = torch.tensor([peak, sec], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(v, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps({"seq": args.seq, "loss": loss, "peak_gib_max_rank": float(v[0]),
                                      "step_s": float(v[1])}), flush=True)
    dist.destroy_process_group()


def try_length(args: argparse.Namespace, mode: str, seq: int) -> dict:
    """Run one worker job; ``{"seq", "ok", ...}``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           __file__, "--worker", "--mode", mode, "--seq", str(seq), "--timeout", str(args.timeout)] + \
        [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("n_layer", "n_embd", "n_head", "vocab")] + \
        (["--smoke"] if args.smoke else [])
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")
    t0 = time.time()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout + 60)
        text, rc = out.stdout + out.stderr, out.returncode
    except subprocess.TimeoutExpired as e:
        text, rc = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""), -9
    row = {"seq": seq, "mode": mode, "ok": False, "wall_s": round(time.time() - t0, 1), "rc": rc}
    for line in text.splitlines():
        if line.startswith("RESULT "):
            row.update(json.loads(line[7:]), ok=rc == 0)
    if not row["ok"]:
        row["why"] = "out of memory" if "OOM" in text or "OutOfMemory" in text else \
            "timeout" if rc == -9 else (text.strip().splitlines() or ["?"])[-1][:300]
        if "OOM" not in text and rc != -9:
            row["log_tail"] = text[-2000:]
    return row


def driver(args: argparse.Namespace) -> None:
    import torch

    results: dict[str, list[dict]] = {}
    for mode in args.modes.split(","):
        rows = results.setdefault(mode, [])
        seq = args.start
        while seq <= args.max:
            row = try_length(args, mode, seq)
            rows.append(row)
            state = (f"ok  peak {row['peak_gib_max_rank']:.1f} GiB  step {row['step_s']:.2f} s" if row["ok"]
                     else f"FAILED ({row['why']})")
            print(f"{mode:>6} S={seq:>7}: {state}", flush=True)
            if not row["ok"]:
                break
            seq *= 2
    summary = {m: max((r["seq"] for r in rows if r["ok"]), default=0) for m, rows in results.items()}
    print("longest sequence trained:", summary)
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "cpu (smoke)",
            "nproc": args.nproc, "model": dict(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
                                               vocab=args.vocab),
            "longest": summary, "tries": results}
    out = Path(args.out or ("/tmp/meshpar-bench-smoke" if args.smoke else ROOT / "bench" / "results"))
    out.mkdir(parents=True, exist_ok=True)
    f = out / f"max_seq-{'smoke-' if args.smoke else ''}{args.nproc}gpu-{int(time.time())}.json"
    f.write_text(json.dumps(info, indent=1))
    print("wrote", f)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per job")
    ap.add_argument("--modes", default="dense,sp", help="comma list of dense, sp")
    ap.add_argument("--start", type=int, default=8192)
    ap.add_argument("--max", type=int, default=1 << 20)
    ap.add_argument("--timeout", type=int, default=300, help="seconds per job")
    ap.add_argument("--n-layer", type=int, default=24)
    ap.add_argument("--n-embd", type=int, default=2048)
    ap.add_argument("--n-head", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--smoke", action="store_true", help="gloo/CPU, tiny model, two lengths, 2 processes")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="dense", help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.smoke and not args.worker:
        args.n_layer, args.n_embd, args.n_head, args.vocab = 2, 32, 4, 64
        args.start, args.max, args.nproc, args.timeout = 32, 64, 2, 120
    if args.worker:
        worker(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
