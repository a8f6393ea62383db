"""ZeRO on CPU with gloo (or GPUs with NCCL): data parallel, optionally combined with tensor parallel.

    torchrun --nproc-per-node 4 examples/zero/train.py --stage 3
    torchrun --nproc-per-node 4 examples/zero/train.py --stage 2 --tp 2      # mesh data=2 x tp=2
    torchrun --nproc-per-node 4 examples/zero/train.py --stage 1 --bf16

Each rank trains on its slice of the global batch; the loss and the per-rank memory report are
printed by rank 0.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

import meshpar as mp
from meshpar import P


class Lin(nn.Module):
    """``x @ w + b`` whose parameters may be ShardedTensors (their specs choose the algorithm)."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.w, self.b = nn.Parameter(w), nn.Parameter(b)

    def forward(self, x):
        return x @ self.w + self.b


def build(mesh: mp.Mesh, tp: bool, dtype: torch.dtype, d: int = 64, h: int = 256) -> nn.Module:
    torch.manual_seed(0)
    w1, b1 = torch.randn(d, h, dtype=dtype) / d ** 0.5, torch.zeros(h, dtype=dtype)
    w2, b2 = torch.randn(h, d, dtype=dtype) / h ** 0.5, torch.zeros(d, dtype=dtype)
    if tp:  # Megatron 1D: column- then row-parallel over "tp"; ZeRO adds "data" to the state specs
        w1, b1 = mp.shard(w1, P(None, "tp"), mesh), mp.shard(b1, P("tp"), mesh)
        w2, b2 = mp.shard(w2, P("tp", None), mesh), mp.shard(b2, P(), mesh)
    return nn.Sequential(Lin(w1, b1), nn.GELU(), Lin(w2, b2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    world = dist.get_world_size()
    mesh = mp.Mesh((world // args.tp, args.tp), ("data", "tp"))
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = build(mesh, args.tp > 1, dtype).to(mesh.device)
    opt = mp.optim.zero(torch.optim.AdamW(model.parameters(), lr=1e-2), mesh, stage=args.stage, axis="data",
                        module=model, max_grad_norm=1.0)

    nd, r = mesh.size("data"), mesh.coord("data")
    g = torch.Generator().manual_seed(0)
    target = torch.randn(64, 64, generator=g)
    for step in range(args.steps):
        x = torch.randn(args.batch, 64, generator=g)
        y = torch.tanh(x @ target)
        if args.tp > 1:  # the batch is sharded over data by the spec; the loss is the global mean
            xs, ys = mp.shard(x.to(dtype), P("data", None), mesh), mp.shard(y.to(dtype), P("data", None), mesh)
        else:            # plain DP: each rank its slice, grads averaged over data (DDP convention)
            xs, ys = x.chunk(nd)[r].to(dtype).to(mesh.device), y.chunk(nd)[r].to(dtype).to(mesh.device)
        loss = ((model(xs) - ys) ** 2).mean()
        opt.scale_loss(loss).backward()
        opt.step()
        opt.zero_grad()
        if step % 5 == 0:
            value = float(loss.detach())  # on every rank: a sharded loss may need a collective to read
            if dist.get_rank() == 0:
                print(f"step {step:3d} loss {value:.4f}", flush=True)
    opt.zero_grad()
    rep = mp.memory_report(opt, model)
    if dist.get_rank() == 0:
        print(f"ZeRO-{args.stage} on {mesh}: {rep}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
