"""A plain nanoGPT-style model (model.py: no meshpar in it) parallelized from outside, trained for a few steps.

    torchrun --nproc-per-node 4 examples/nanogpt/train.py --mode 1d   # data 2 x tp 2
    torchrun --nproc-per-node 4 examples/nanogpt/train.py --mode 2d   # SUMMA on a 2 x 2 grid
    torchrun --nproc-per-node 4 examples/nanogpt/train.py --mode sp   # data 2 x sequence 2 (ring attention)

Every rank feeds its data rank's *local* batch; the loss printed is the loss of the global batch,
and it is checked against the same dense model on rank 0.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import meshpar as mp
from meshpar.models.plans import parallel_plan

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import NanoConfig, NanoGPT  # noqa: E402

MESHES = {"1d": ((2, 2), ("data", "tp")), "2d": ((2, 2), ("x", "y")), "sp": ((2, 2), ("data", "sp"))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=sorted(MESHES), default="1d")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    torch.manual_seed(0)  # the same dense initial model on every rank
    shape, names = MESHES[args.mode]
    mesh = mp.Mesh(shape, names)
    data = ("data",) if "data" in names else ()

    model = NanoGPT(NanoConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32)).double()
    dense = copy.deepcopy(model)
    mp.parallelize(model, mesh, parallel_plan("nanogpt", args.mode, data=data))   # the two lines

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    dense_opt = torch.optim.AdamW(dense.parameters(), lr=1e-2)
    nd, d = (mesh.size("data"), mesh.coord("data")) if data else (1, 0)
    g = torch.Generator().manual_seed(1)
    for step in range(args.steps):
        idx = torch.randint(0, 64, (8, 16), generator=g)  # the global batch (same on every rank here) ...
        tg = torch.roll(idx, -1, 1)
        loss = model(idx.chunk(nd)[d], tg.chunk(nd)[d])   # ... of which each data rank feeds its own rows
        loss = mp.unshard(loss) if isinstance(loss, mp.ShardedTensor) else loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref = dense(idx, tg)
        dense_opt.zero_grad()
        ref.backward()
        dense_opt.step()
        if dist.get_rank() == 0:
            print(f"step {step}: loss {float(loss.detach()):.6f} (dense {float(ref.detach()):.6f})")
        assert abs(float(loss.detach()) - float(ref.detach())) < 1e-9 * abs(float(ref.detach()))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
