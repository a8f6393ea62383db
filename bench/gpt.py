"""End-to-end GPT training throughput: meshpar vs FSDP2 (and FSDP2+TP) in the same run.

    # on the GPU machine, per world size (1, 2, 4):
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    torchrun --standalone --nproc-per-node 4 bench/gpt.py --modes dp,2d,fsdp2,fsdp2_tp
    # CPU smoke test of the script itself (gloo, tiny sizes):
    torchrun --standalone --nproc-per-node 4 bench/gpt.py --smoke

Defaults: a ~1.2B-parameter GPT (24 layers, d=2048, 16 heads, vocab 50304), seq 2048, bf16.
Each mode trains ``--warmup`` steps, then times ``--steps`` (median; CUDA events on GPU, max
over ranks) and reports tokens/s and MFU (6N + 12·L·T·C FLOPs per token, peak 989 TFLOP/s
per H100/H200 by default). Before timing, the first-step loss of every mode is checked
against the same dense initialization. JSON goes to ``--out`` (bench/results/).

Modes: ``dp`` meshpar data parallel + ZeRO-1 (``--zero``); ``1d``/``2d`` meshpar tensor
parallel over all ranks (2d needs a square); ``fsdp2`` torch ``fully_shard`` per block;
``fsdp2_tp`` FSDP2 over dp × torch TP (Colwise/Rowwise) over tp=2 (4+ ranks).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, results_dir  # noqa: E402
import meshpar as mp  # noqa: E402
import meshpar.train as mt  # noqa: E402
from meshpar.models.gpt import GPT, GPTConfig  # noqa: E402


# ------------------------------------------------------------------ the model
# Both sides train meshpar's plain GPT (meshpar.models.gpt, an ordinary nn.Module): meshpar lays it out
# with parallelize (the config's plan table), the baseline with FSDP2 (and torch TP).


def n_params_of(cfg: GPTConfig) -> int:
    """Parameter count of ``GPT(cfg)`` without building it."""
    C, V, L = cfg.n_embd, cfg.vocab_size, cfg.n_layer
    b = 1 if cfg.bias else 0
    per_layer = 2 * C * (1 + b) + 4 * (C * C + b * C) + (4 * C * C + b * 4 * C) + (4 * C * C + b * C)
    return V * C + cfg.block_size * C + L * per_layer + C * (1 + b) + C * V


# ------------------------------------------------------------------ runs
def peak_flops(smoke: bool) -> float | None:
    if smoke or not torch.cuda.is_available():
        return None
    from meshpar.train.hooks import default_peak_flops
    return default_peak_flops() or 989e12


def timed(step, warmup: int, steps: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
    return times


def batch(args, gcfg: GPTConfig, device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, gcfg.vocab_size, (args.batch, gcfg.block_size + 1), generator=g)
    return t[:, :-1].to(device), t[:, 1:].to(device)


def run_meshpar(mode: str, args, gcfg: GPTConfig, world: int, dtype) -> tuple[float, list[float]]:
    tensor = None if mode in ("dense", "dp") else dict(size=world, mode=mode)
    if mode == "2.5d":
        tensor["depth"] = 1 if world == 1 else 2
    cfg = dict(parallel=dict(tensor=tensor), zero=dict(stage=args.zero if mode == "dp" else 0),
               precision="fp32" if args.smoke else "bf16", seed=0)
    ctx = mt.context_for(cfg)
    model = mt.parallelize_model(GPT(gcfg, seed=0), ctx).to(ctx.device)
    engine, *_ = mt.initialize(model, torch.optim.AdamW(model.parameters(), lr=1e-4), None, ctx=ctx)
    nd = ctx.mesh.size("data")
    x, y = batch(args, gcfg, ctx.device)
    if mode in ("dense", "dp"):  # each data rank takes its slice of the global batch
        r = ctx.mesh.coord("data")
        per = args.batch // nd
        x, y = x[r * per:(r + 1) * per], y[r * per:(r + 1) * per]
    first = {}

    def step():
        engine.zero_grad()
        loss = engine(x, y)  # a ShardedTensor scalar (P()) under a plan
        loss = mp.unshard(loss) if isinstance(loss, mp.ShardedTensor) else loss
        engine.backward(loss)
        engine.step()
        first.setdefault("loss", float(loss.detach()))
    t = timed(step, args.warmup, args.steps, ctx.device)
    loss = first["loss"]
    if mode in ("dense", "dp"):
        v = torch.tensor([loss], device=ctx.device)
        dist.all_reduce(v)
        loss = float(v) / nd
    return loss, t


def run_fsdp(mode: str, args, gcfg: GPTConfig, world: int, dtype, device) -> tuple[float, list[float]]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = GPT(gcfg, seed=0).to(device)
    dt = device.type
    mpp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32 else None
    kw = {"mp_policy": mpp} if mpp else {}
    x, y = batch(args, gcfg, device)
    if mode == "fsdp2_tp":
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
        tp = 2
        mesh = init_device_mesh(dt, (world // tp, tp), mesh_dim_names=("dp", "tp"))
        for b in model.h:
            # local outputs: the plain GPT's view(B, T, -1, hd) takes this rank's heads
            col = ColwiseParallel()
            parallelize_module(b, mesh["tp"], {"attn.q": col, "attn.k": col, "attn.v": col,
                                               "attn.proj": RowwiseParallel(), "mlp.fc": col,
                                               "mlp.proj": RowwiseParallel()})
        dp_mesh, nd, r = mesh["dp"], world // tp, mesh.get_local_rank("dp")
    else:
        dp_mesh = init_device_mesh(dt, (world,))
        nd, r = world, dist.get_rank()
    for b in model.h:
        fully_shard(b, mesh=dp_mesh, **kw)
    fully_shard(model, mesh=dp_mesh, **kw)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    per = args.batch // nd
    x, y = x[r * per:(r + 1) * per], y[r * per:(r + 1) * per]
    first = {}

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(x, y)
        loss.backward()
        opt.step()
        first.setdefault("loss", float(loss.detach()))
    t = timed(step, args.warmup, args.steps, device)
    v = torch.tensor([first["loss"]], device=device)
    dist.all_reduce(v)
    return float(v) / world, t  # every tp peer holds the same loss: the mean over all ranks is the dp mean


def main() -> None:
    ap = base_parser(__doc__, smoke_help="tiny sizes, fp32, gloo/CPU: checks the script runs")
    ap.add_argument("--modes", default=None, help="comma list of dense,dp,1d,2d,2.5d,3d,fsdp2,fsdp2_tp (default: "
                    "all that fit); at world 1 the tensor plans run on size-1 axes")
    ap.add_argument("--n-layer", type=int, default=24)
    ap.add_argument("--n-embd", type=int, default=2048)
    ap.add_argument("--n-head", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    ap.add_argument("--zero", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    if args.smoke:
        args.n_layer, args.n_embd, args.n_head, args.vocab, args.seq = 2, 64, 4, 256, 64
        args.warmup, args.steps = 1, 3
    if "RANK" not in os.environ:  # one process without torchrun
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(s.getsockname()[1]))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    use_cuda = torch.cuda.is_available() and not args.smoke
    if use_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=600))
    dtype = torch.float32 if args.smoke else torch.bfloat16
    gcfg = GPTConfig(vocab_size=args.vocab, block_size=args.seq, n_layer=args.n_layer, n_head=args.n_head,
                     n_embd=args.n_embd)
    square = math.isqrt(world) ** 2 == world
    modes = args.modes.split(",") if args.modes else \
        ["dp"] + (["1d"] if world > 1 else []) + (["2d"] if square and world > 1 else []) + \
        (["fsdp2"]) + (["fsdp2_tp"] if world >= 4 and world % 2 == 0 else [])
    n_params = n_params_of(gcfg)
    fpt = 6 * n_params + 12 * gcfg.n_layer * gcfg.block_size * gcfg.n_embd
    peak = peak_flops(args.smoke)
    tokens = args.batch * args.seq
    results = []
    ref = None
    for mode in modes:
        if mode in ("dense", "dp", "1d", "2d", "2.5d", "3d"):
            loss, times = run_meshpar(mode, args, gcfg, world, dtype)
        else:
            loss, times = run_fsdp(mode, args, gcfg, world, dtype, device)
        med = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
        dist.all_reduce(med, op=dist.ReduceOp.MAX)
        sec = float(med)
        ref = loss if ref is None else ref
        tol = 1e-4 if args.smoke else 5e-2
        ok = abs(loss - ref) <= tol * max(1.0, abs(ref))
        row = {"mode": mode, "first_loss": loss, "loss_matches_first_mode": ok, "median_step_s": sec,
               "tokens_per_s": tokens / sec, "tokens_per_s_per_gpu": tokens / sec / world,
               "mfu": fpt * tokens / sec / (peak * world) if peak else None}
        results.append(row)
        if rank == 0:
            mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
            print(f"{mode:>9}: loss0 {loss:.4f} ({'ok' if ok else 'MISMATCH'}) step {sec * 1e3:8.1f} ms  "
                  f"{row['tokens_per_s']:10.0f} tok/s  MFU {mfu}", flush=True)
    if rank == 0:
        base = {r["mode"]: r["tokens_per_s"] for r in results}
        anchor = base.get("fsdp2_tp") or base.get("fsdp2")
        for r in results:
            r["ratio_vs_fsdp2_baseline"] = r["tokens_per_s"] / anchor if anchor else None
            # step time over the dense plan's (meshpar's engine, no tensor plan, no ZeRO): the framework's cost
            r["step_time_vs_dense"] = base["dense"] / r["tokens_per_s"] if "dense" in base else None
            if r["step_time_vs_dense"] is not None:
                print(f"{r['mode']:>9}: step time {r['step_time_vs_dense']:.3f}x the dense plan's", flush=True)
        info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "torch": torch.__version__,
                "nccl": ".".join(map(str, torch.cuda.nccl.version())) if use_cuda else None,
                "device": torch.cuda.get_device_name() if use_cuda else "cpu (smoke)", "world_size": world,
                "params": n_params, "flops_per_token": fpt, "peak_flops": peak, "seq": args.seq,
                "global_batch": args.batch, "dtype": str(dtype), "steps": args.steps, "warmup": args.warmup,
                "model": dict(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, vocab=args.vocab),
                "results": results}
        out = results_dir(args.out)
        f = out / f"gpt-{'smoke-' if args.smoke else ''}{world}gpu-{int(time.time())}.json"
        f.write_text(json.dumps(info, indent=1))
        print(f"wrote {f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
