"""Train the functional GPT for a few AdamW steps in one tensor-parallel mode and check it against
the dense model (float64), then sample from it.

    torchrun --nproc-per-node 4 examples/tensor_parallel/gpt_modes.py --mode 1d          # tp=4
    torchrun --nproc-per-node 8 examples/tensor_parallel/gpt_modes.py --mode 1d --data 2 # data=2 x tp=4
    torchrun --nproc-per-node 4 examples/tensor_parallel/gpt_modes.py --mode 2d          # 2x2 SUMMA
    torchrun --nproc-per-node 8 examples/tensor_parallel/gpt_modes.py --mode 2d --data 2
    torchrun --nproc-per-node 8 examples/tensor_parallel/gpt_modes.py --mode 2.5d        # 2x2x2 Tesseract
    torchrun --nproc-per-node 8 examples/tensor_parallel/gpt_modes.py --mode 3d          # 2x2x2 cube

The model code is the same in every mode; only the plan (a table of specs) changes.
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

import meshpar as mp
import meshpar.nn  # noqa: F401  (layer rules)
from meshpar.models.gpt_functional import GPT, GPTConfig
from meshpar.models.plans import make_plan, unpad
from meshpar.sharding import unshard
from _common import init

AXES = {"1d": ("tp",), "2d": ("x", "y"), "2.5d": ("d", "x", "y"), "3d": ("i", "j", "k")}


def build_mesh(mode: str, data: int) -> mp.Mesh:
    world = dist.get_world_size() // data
    sizes = {"1d": (world,), "2d": (round(world ** 0.5),) * 2, "2.5d": None, "3d": (round(world ** (1 / 3)),) * 3}
    if mode == "2.5d":
        q = 2 if world >= 8 else 1
        sizes["2.5d"] = (world // (q * q), q, q)
    shape, names = sizes[mode], AXES[mode]
    if data > 1:
        shape, names = (data, *shape), ("data", *names)
    return mp.Mesh(shape, names)


def train(model: GPT, steps: int, batch: int, seq: int) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)  # the same batches on every rank; the plan slices them
    losses = []
    for step in range(steps):
        idx = torch.randint(0, model.cfg.vocab_size, (batch, seq + 1), generator=g)
        loss = model(idx[:, :-1], idx[:, 1:], train=True, seed=step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=list(AXES), default="2d")
    ap.add_argument("--data", type=int, default=1, help="size of the data-parallel axis")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    init()
    mesh = build_mesh(args.mode, args.data)
    # vocab 101 and 6 heads do not divide every mesh: the plan pads them, the loss is unchanged
    cfg = GPTConfig(vocab_size=101, block_size=16, n_layer=2, n_head=6, n_embd=48, dropout=0.1)
    dense = GPT(cfg, None, dtype=torch.float64)
    sharded = GPT(cfg, make_plan(args.mode, mesh), dense.params(), dtype=torch.float64)
    batch = 4 * mesh.size(tuple(a for a in mesh.names if a not in ("y", "k", "tp")))
    ref = train(dense, args.steps, batch, 12)
    got = train(sharded, args.steps, batch, 12)
    with torch.no_grad():
        err = max(float((unpad(n, unshard(p), cfg) - dense.params()[n]).abs().max())
                  for n, p in sharded.named_parameters())
    text = sharded.generate(torch.zeros(1 * batch, 1, dtype=torch.long), 8, top_k=10, seed=0)
    if dist.get_rank() == 0:
        print(f"mode {args.mode} on {mesh}: losses {[f'{l:.4f}' for l in got]} (dense {[f'{l:.4f}' for l in ref]})")
        print(f"max |param - dense param| after {args.steps} AdamW steps: {err:.2e}; sample: {text[0].tolist()}")
    assert err < 1e-9 and all(abs(a - b) < 1e-9 for a, b in zip(got, ref))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
