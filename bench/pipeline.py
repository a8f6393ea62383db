"""Pipeline-parallel benchmark: meshpar schedules vs torch.distributed.pipelining, same run.

A GPT-like stack (token+position embedding, ``layers`` pre-LN transformer blocks with causal
SDPA, final LayerNorm + LM head) in bf16 is split into 4 pipeline stages (8 virtual stages for
the interleaved schedules). For each of

* meshpar ``gpipe``, ``1f1b``, ``interleaved`` (2 chunks per rank)
* torch ``Schedule1F1B`` and ``ScheduleInterleaved1F1B`` on the *same* stage modules

it measures the step time (forward + backward of one global batch split into ``m`` micro-batches;
no optimizer step), as the median of ``--steps`` timed steps after ``--warmup`` steps, max over
ranks. Reported per schedule: tokens/s, the ratio to torch's same schedule, the efficiency
``t_1 / (p * t_step)`` against the one-device time ``t_1`` of the same micro-batches (so
``1 - efficiency`` estimates the bubble plus communication), meshpar's measured bubble
(``1 - compute time / step time`` per rank, from the executor's per-action timing) and the
theory ``(p - 1) / (v m + p - 1)``.

Before timing, the first meshpar step's loss is checked against the one-device loss.

GPU (4 GPUs, NCCL)::

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
        torchrun --nproc-per-node 4 bench/pipeline.py

CPU smoke test (spawns 4 gloo processes itself, tiny sizes, a few steps)::

    python bench/pipeline.py --smoke
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as Fn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import meshpar  # noqa: E402
from meshpar.pipeline import Pipeline, make_schedule  # noqa: E402
from meshpar.pipeline.blocks import build_chunk  # noqa: E402
from meshpar.pipeline.partition import partition  # noqa: E402


# ----------------------------------------------------------------------------- model
class Embed(nn.Module):
    """tokens[b, s] (int64) -> x[b, s, h]."""

    def __init__(self, vocab: int, seq: int, h: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, h)
        self.pos = nn.Embedding(seq, h)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))


class Block(nn.Module):
    """Pre-LN transformer block on x[b, s, h] with ``heads`` heads and a 4h MLP."""

    def __init__(self, h: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.qkv, self.proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.fc1, self.fc2 = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        a = Fn.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, h))
        return x + self.fc2(Fn.gelu(self.fc1(self.ln2(x))))


class Head(nn.Module):
    """x[b, s, h] -> logits[b, s, vocab]."""

    def __init__(self, h: int, vocab: int):
        super().__init__()
        self.ln = nn.LayerNorm(h)
        self.out = nn.Linear(h, vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(x))


def gpt_blocks(a, device, dtype) -> list[nn.Module]:
    torch.manual_seed(0)
    blocks = [Embed(a.vocab, a.seq, a.hidden)] + [Block(a.hidden, a.heads) for _ in range(a.layers)] + \
             [Head(a.hidden, a.vocab)]
    return [b.to(device=device, dtype=dtype) for b in blocks]


def lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return Fn.cross_entropy(logits.float().flatten(0, 1), target.flatten())


# ----------------------------------------------------------------------------- timing
class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.s, self.e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.s.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.e.record()
            torch.cuda.synchronize()
            self.dt = self.s.elapsed_time(self.e) / 1e3
        else:
            self.dt = time.perf_counter() - self.t0


def max_over_ranks(x: float, device) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def time_steps(fn, a, device) -> list[float]:
    for _ in range(a.warmup):
        fn()
    out = []
    for _ in range(a.steps):
        dist.barrier()
        with Timer(device) as t:
            fn()
        out.append(max_over_ranks(t.dt, device))
    return out


# ----------------------------------------------------------------------------- runs
def data(a, device):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=g).to(device)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def run_meshpar(a, mesh, device, dtype, schedule, chunks, x, y, ref_loss):
    pipe = Pipeline(gpt_blocks(a, device, dtype), mesh, lm_loss, schedule=schedule, num_microbatches=a.micro,
                    chunks=chunks, record_timing=True)

    def step():
        pipe.zero_grad(set_to_none=True)
        return pipe.step(x, y)

    loss = float(step())
    if not math.isclose(loss, ref_loss, rel_tol=3e-2):
        raise AssertionError(f"meshpar {schedule}: loss {loss} differs from the one-device loss {ref_loss}")
    times = time_steps(step, a, device)
    bubble = 1.0 - pipe.stats["compute_s"] / pipe.stats["step_s"]
    bubbles = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(bubbles, torch.tensor([bubble], dtype=torch.float64, device=device))
    return times, statistics.mean(float(b) for b in bubbles), loss


def run_torch(a, mesh, device, dtype, schedule, chunks, x, y):
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

    p, r = mesh.size("pipe"), mesh.coord("pipe")
    blocks = gpt_blocks(a, device, dtype)
    ranges = partition(blocks, p * chunks)
    group = mesh.group("pipe")
    stages = [PipelineStage(build_chunk(blocks, *ranges[c * p + r]), c * p + r, p * chunks, device, group=group)
              for c in range(chunks)]
    sched = (Schedule1F1B(stages[0], a.micro, loss_fn=lm_loss) if chunks == 1
             else ScheduleInterleaved1F1B(stages, a.micro, loss_fn=lm_loss))

    def step():
        for s in stages:
            s.submod.zero_grad(set_to_none=True)
        losses: list = []
        if r == 0:
            sched.step(x, target=y if p == 1 else None, losses=losses)
        elif r == p - 1:
            sched.step(target=y, losses=losses)
        else:
            sched.step()
        return losses

    return time_steps(step, a, device)


def run_single(a, device, dtype, x, y):
    """One device, all blocks, the same micro-batches: the reference loss and time t_1."""
    model = nn.Sequential(*gpt_blocks(a, device, dtype))
    xs, ys = x.chunk(a.micro), y.chunk(a.micro)

    def step():
        model.zero_grad(set_to_none=True)
        total = 0.0
        for xm, ym in zip(xs, ys):
            loss = lm_loss(model(xm), ym) / a.micro
            loss.backward()
            total += loss.detach()
        return float(total)

    loss = step()
    ts = []
    for _ in range(a.warmup):
        step()
    for _ in range(a.steps):
        with Timer(device) as t:
            step()
        ts.append(t.dt)
    return loss, ts


def main(a) -> None:
    backend = "nccl" if torch.cuda.is_available() and not a.smoke else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        dist.init_process_group(backend)
    p = dist.get_world_size()
    mesh = meshpar.Mesh((p,), ("pipe",))
    device = mesh.device
    dtype = getattr(torch, a.dtype)
    x, y = data(a, device)
    # one-device reference (every rank computes it; rank 0's time is reported)
    ref_loss, t1s = run_single(a, device, dtype, x, y) if mesh.rank == 0 else (0.0, [0.0])
    ref_loss = max_over_ranks(ref_loss, device)
    t1 = statistics.median(t1s)
    tokens = a.batch * a.seq
    rows = []
    for name, impl, sched, chunks in [("meshpar gpipe", "meshpar", "gpipe", 1),
                                      ("meshpar 1f1b", "meshpar", "1f1b", 1),
                                      ("torch Schedule1F1B", "torch", "1f1b", 1),
                                      ("meshpar interleaved", "meshpar", "interleaved", 2),
                                      ("torch ScheduleInterleaved1F1B", "torch", "interleaved", 2)]:
        if impl == "meshpar":
            times, bubble, loss = run_meshpar(a, mesh, device, dtype, sched, chunks, x, y, ref_loss)
        else:
            times, bubble, loss = run_torch(a, mesh, device, dtype, sched, chunks, x, y), None, None
        med = statistics.median(times)
        theory = make_schedule(sched, p, a.micro, chunks).theoretical_bubble()
        rows.append({"name": name, "schedule": sched, "chunks": chunks, "median_step_s": med, "times_s": times,
                     "tokens_per_s": tokens / med, "efficiency_vs_one_device": t1 / (p * med),
                     "measured_bubble": bubble, "theory_bubble": theory, "first_loss": loss})
    torch_by = {r["schedule"]: r for r in rows if r["name"].startswith("torch")}
    for r in rows:
        t = torch_by.get(r["schedule"])
        r["ratio_vs_torch"] = (t["median_step_s"] / r["median_step_s"]) if t and not r["name"].startswith("torch") else None
    if mesh.rank == 0:
        print(f"pipeline bench: p={p} m={a.micro} layers={a.layers} hidden={a.hidden} seq={a.seq} batch={a.batch} "
              f"{a.dtype} {backend}; one-device step {t1 * 1e3:.2f} ms, reference loss {ref_loss:.4f}")
        print(f"{'schedule':32s} {'step ms':>9s} {'tok/s':>10s} {'vs torch':>9s} {'eff':>6s} {'bubble':>7s} {'theory':>7s}")
        for r in rows:
            vs = f"{r['ratio_vs_torch']:.2f}x" if r["ratio_vs_torch"] else "-"
            bub = f"{r['measured_bubble']:.1%}" if r["measured_bubble"] is not None else "-"
            print(f"{r['name']:32s} {r['median_step_s'] * 1e3:9.2f} {r['tokens_per_s']:10.0f} {vs:>9s} "
                  f"{r['efficiency_vs_one_device']:6.2f} {bub:>7s} {r['theory_bubble']:7.1%}")
        dev = torch.cuda.get_device_name() if backend == "nccl" else platform.processor() or "cpu"
        result = {"bench": "pipeline", "smoke": a.smoke, "device": dev, "world": p, "backend": backend,
                  "torch": torch.__version__,
                  "nccl": ".".join(map(str, torch.cuda.nccl.version())) if backend == "nccl" else None,
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "sizes": {k: getattr(a, k) for k in ("layers", "hidden", "heads", "seq", "vocab", "batch", "micro")},
                  "dtype": a.dtype, "one_device_step_s": t1, "reference_loss": ref_loss, "rows": rows,
                  "anchor": "torch.distributed.pipelining, same stages, same run; target ratio_vs_torch >= 1"}
        out = a.out or (os.path.join("/tmp", "pipeline_smoke.json") if a.smoke else
                        os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                     f"pipeline_{datetime.date.today().isoformat()}.json"))
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {out}")
    dist.barrier()
    dist.destroy_process_group()


def _spawned(rank: int, world: int, port: int, a) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    main(a)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU/gloo, tiny sizes, spawns 4 processes")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--micro", type=int, default=8, help="micro-batches per step (multiple of 4 for interleaved)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.smoke:
        a.layers, a.hidden, a.heads, a.seq, a.vocab, a.batch, a.micro = 6, 32, 4, 16, 64, 8, 4
        a.warmup, a.steps = 1, 3
    return a


if __name__ == "__main__":
    args = parse()
    if "RANK" in os.environ:
        main(args)
    else:
        import socket

        import torch.multiprocessing as tmp

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            free = s.getsockname()[1]
        tmp.spawn(_spawned, args=(4, free, args), nprocs=4, join=True)
