"""Train meshpar's plain GPT for a few AdamW steps in one tensor-parallel mode and check it against
the dense model (float64), then sample from it.

    torchrun --nproc-per-node 4 examples/tensor_parallel/gpt_modes.py --mode 1d          # tp=4
    torchrun --nproc-per-node 8 examples/tensor_parallel/gpt_modes.py --mode 1d --data 2 # data=2 x tp=4
    torchrun --nproc-per-node 4 examples/tensor_parallel/gpt_modes.py --mode 2d          # 2x2 SUMMA
    torchrun --nproc-per-node 8 examples/tensor_parallel/gpt_modes.py --mode 2d --data 2
    torchrun --nproc-per-node 8 examples/tensor_parallel/gpt_modes.py --mode 2.5d        # 2x2x2 Tesseract
    torchrun --nproc-per-node 8 examples/tensor_parallel/gpt_modes.py --mode 3d          # 2x2x2 cube

The model is a plain nn.Module; only the plan table given to ``mp.parallelize`` changes.
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

import meshpar as mp
import meshpar.nn  # noqa: F401  (layer rules)
import copy

from meshpar.models.gpt import GPT, GPTConfig
from meshpar.models.plans import parallel_plan
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


def train(model: GPT, steps: int, batch: int, seq: int, mesh: mp.Mesh | None = None) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)  # the same global batches on every rank
    losses = []
    for step in range(steps):
        idx = torch.randint(0, model.cfg.vocab_size, (batch, seq + 1), generator=g)
        if mesh is not None and "data" in mesh.names:  # the batch contract: each data rank passes its block
            idx = idx.chunk(mesh.size("data"))[mesh.coord("data")]
        loss = model(idx[:, :-1], idx[:, 1:])
        loss = unshard(loss) if isinstance(loss, mp.ShardedTensor) else loss
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
    # nothing is padded: vocab and heads must divide the mesh's splits (parallelize says which does not)
    cfg = GPTConfig(vocab_size=96, block_size=16, n_layer=2, n_head=4, n_embd=48)
    dense = GPT(cfg, dtype=torch.float64)
    data = ("data",) if "data" in mesh.names else ()
    sharded = mp.parallelize(copy.deepcopy(dense), mesh, parallel_plan("gpt", args.mode, data=data))
    batch = 4 * mesh.size(tuple(a for a in mesh.names if a not in ("y", "tp", "k")))  # the batch splits
    ref = train(dense, args.steps, batch, 12)
    got = train(sharded, args.steps, batch, 12, mesh)
    dp = dict(dense.named_parameters())
    with torch.no_grad():
        err = max(float((unshard(p) - dp[n]).abs().max()) for n, p in sharded.named_parameters())
    prompt = torch.zeros(batch // (mesh.size("data") if data else 1), 1, dtype=torch.long)
    text = sharded.generate(prompt, 8, top_k=10, seed=0, gather=unshard)
    if dist.get_rank() == 0:
        print(f"mode {args.mode} on {mesh}: losses {[f'{l:.4f}' for l in got]} (dense {[f'{l:.4f}' for l in ref]})")
        print(f"max |param - dense param| after {args.steps} AdamW steps: {err:.2e}; sample: {text[0].tolist()}")
    assert err < 1e-9 and all(abs(a - b) < 1e-9 for a, b in zip(got, ref))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
