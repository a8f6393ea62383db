"""ZeRO benchmark: ours (DP, ZeRO-1/2/3) vs torch DDP and FSDP2 ``fully_shard`` on a GPT-like stack.

    # GPU (per protocol; ~1.3B params, bf16, 4 GPUs):
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
        torchrun --nproc-per-node 4 bench/zero.py
    # CPU smoke test (gloo, tiny sizes; checks the script end to end, times mean nothing):
    torchrun --nproc-per-node 2 bench/zero.py --smoke

Every variant trains the identical model (same init, batch and sequence) with AdamW. Before timing,
each variant's first loss is checked against DDP's (same init, same batch). Reported per variant:
tokens/s (global), the median step time over ``--iters`` timed steps after ``--warmup`` steps
(CUDA events on GPU, max over ranks) and peak memory (max over ranks). Ratios: ZeRO-3 vs FSDP2,
DP/ZeRO-1/ZeRO-2 vs DDP (tokens/s ratio > 1 is faster; memory ratio < 1 is smaller).
JSON goes to bench/results/.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import meshpar as mp


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, seq: int, d: int, layers: int, heads: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.lnf, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.lnf(x))


def build(cfg: dict, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return GPT(cfg["vocab"], cfg["seq"], cfg["d"], cfg["layers"], cfg["heads"]).to(device)


def loss_fn(model: nn.Module, idx: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    logits = model(idx)
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), tgt.reshape(-1))


class Timer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def stop(self, t0) -> float:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            e.synchronize()
            return t0.elapsed_time(e) / 1e3
        return time.perf_counter() - t0


def variant(name: str, cfg: dict, mesh: mp.Mesh, device: torch.device, dtype: torch.dtype):
    """(model, step(idx, tgt) -> loss)."""
    model = build(cfg, device)
    lr = 1e-4
    if name.startswith("ours"):
        stage = int(name[-1])
        opt = mp.optim.zero(torch.optim.AdamW(model.parameters(), lr=lr), mesh, stage=stage, axis="data",
                            module=model, compute_dtype=dtype, bucket_mb=cfg["bucket_mb"])

        def step(idx, tgt):
            loss = loss_fn(model, idx, tgt)
            opt.scale_loss(loss).backward()
            opt.step()
            opt.zero_grad()
            return loss
        return model, step
    if name == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                  bucket_cap_mb=cfg["bucket_mb"])
        opt = torch.optim.AdamW(ddp.parameters(), lr=lr)

        def step(idx, tgt):
            with torch.autocast(device.type, dtype=dtype):
                loss = loss_fn(ddp, idx, tgt)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
        return ddp, step
    if name == "fsdp2":
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        dm = DeviceMesh.from_group(mesh.group("data") or dist.group.WORLD, device.type)
        pol = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=dtype)
        for blk in model.blocks:
            fully_shard(blk, mesh=dm, mp_policy=pol)
        fully_shard(model, mesh=dm, mp_policy=pol)
        opt = torch.optim.AdamW(model.parameters(), lr=lr)

        def step(idx, tgt):
            loss = loss_fn(model, idx, tgt)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
        return model, step
    raise ValueError(name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="gloo/CPU, tiny sizes")
    ap.add_argument("--variants", default="ddp,ours0,ours1,ours2,fsdp2,ours3")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    cuda = torch.cuda.is_available() and not args.smoke
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    world = dist.get_world_size()
    mesh = mp.Mesh((world,), ("data",))
    if args.smoke:
        cfg = dict(vocab=256, seq=32, d=64, layers=2, heads=4, bucket_mb=0.05)
        args.warmup, args.iters, args.micro_batch = 1, 3, 2
    else:
        cfg = dict(vocab=50304, seq=1024, d=2048, layers=22, heads=16, bucket_mb=25)
    dtype = torch.bfloat16
    n_params = sum(p.numel() for p in build(cfg, torch.device("meta")).parameters())
    tokens = args.micro_batch * cfg["seq"] * world
    g = torch.Generator().manual_seed(1234 + dist.get_rank())
    batches = [torch.randint(0, cfg["vocab"], (args.micro_batch, cfg["seq"] + 1), generator=g).to(device)
               for _ in range(4)]
    timer = Timer(device)
    results: dict[str, dict] = {}
    ref_loss = None
    for name in args.variants.split(","):
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            model, step = variant(name, cfg, mesh, device, dtype)
            first = float(step(batches[0][:, :-1], batches[0][:, 1:]).detach())  # check once before timing
            ref_loss = first if ref_loss is None else ref_loss
            ok = math.isfinite(first) and abs(first - ref_loss) <= 0.02 * abs(ref_loss)
            for i in range(args.warmup):
                b = batches[i % 4]
                step(b[:, :-1], b[:, 1:])
            times = []
            for i in range(args.iters):
                b = batches[i % 4]
                t0 = timer.start()
                step(b[:, :-1], b[:, 1:])
                times.append(timer.stop(t0))
            med = torch.tensor([statistics.median(times)], dtype=torch.float64)
            dist.all_reduce(med, op=dist.ReduceOp.MAX)
            peak = torch.tensor([torch.cuda.max_memory_allocated() if cuda else 0], dtype=torch.float64,
                                device=device if cuda else None)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            results[name] = dict(median_step_s=float(med), tokens_per_s=tokens / float(med),
                                 peak_mem_bytes=int(peak.item()), first_loss=first, loss_matches_ddp=ok)
            del model, step
        except Exception as e:  # report and go on with the other variants
            results[name] = dict(error=f"{type(e).__name__}: {e}")
    for ours, anchor in (("ours3", "fsdp2"), ("ours0", "ddp"), ("ours1", "ddp"), ("ours2", "ddp")):
        a, b = results.get(ours, {}), results.get(anchor, {})
        if "tokens_per_s" in a and "tokens_per_s" in b:
            a["anchor"] = anchor
            a["tokens_ratio"] = a["tokens_per_s"] / b["tokens_per_s"]
            a["mem_ratio"] = a["peak_mem_bytes"] / b["peak_mem_bytes"] if b["peak_mem_bytes"] else None
    if dist.get_rank() == 0:
        out = dict(bench="zero", smoke=args.smoke, date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                   device=torch.cuda.get_device_name() if cuda else "cpu", world=world,
                   torch=torch.__version__, nccl=".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
                   sizes=dict(cfg, params=n_params, micro_batch=args.micro_batch, tokens_per_step=tokens,
                              dtype=str(dtype)), warmup=args.warmup, iters=args.iters, results=results)
        print(f"{'variant':8s} {'tokens/s':>12s} {'step ms':>10s} {'peak MiB':>10s}  ratio vs anchor")
        for name, r in results.items():
            if "error" in r:
                print(f"{name:8s} ERROR {r['error']}")
                continue
            ratio = f"{r['tokens_ratio']:.2f}x {r['anchor']}, mem {r['mem_ratio'] or float('nan'):.2f}" \
                if "tokens_ratio" in r else ""
            print(f"{name:8s} {r['tokens_per_s']:12.1f} {r['median_step_s'] * 1e3:10.2f} "
                  f"{r['peak_mem_bytes'] / 2 ** 20:10.1f}  {ratio}{'' if r['loss_matches_ddp'] else '  LOSS MISMATCH'}")
        path = args.out or os.path.join(os.path.dirname(__file__), "results",
                                        f"zero-{'smoke' if args.smoke else 'gpu'}.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {path}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
