"""Colossal-AI's quick start, as written, on meshpar: a 2D (SUMMA) MLP on a 2 x 2 grid.

    torchrun --nproc-per-node 4 examples/quickstart_colossal.py            # Colossal-AI's sizes
    torchrun --nproc-per-node 4 examples/quickstart_colossal.py --hidden 64 --dim 16 --steps 5

``launch_from_torch`` (or ``launch(config, rank, world_size, host, port, backend)``) sets the context
for what follows in the process, so ``get_dataloader`` and ``initialize`` need no mesh or context.
Each ``Linear2D`` places its own input on the grid; the engine hands the model each data rank's
batch as its block of the global batch (``from_local(x, P("data"))``).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn

import meshpar.train as mt
from meshpar.nn import Linear2D

CONFIG = dict(parallel=dict(tensor=dict(size=4, mode="2d")))


class MLP_2D(nn.Module):  # noqa: N801 (Colossal-AI's name)
    """Colossal-AI's 2D MLP: two ``Linear2D`` layers, one after the other."""

    def __init__(self, dim: int = 1024, hidden: int = 16384):
        super().__init__()
        self.linear_1 = Linear2D(in_features=dim, out_features=hidden)
        self.linear_2 = Linear2D(in_features=hidden, out_features=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_1(x)
        x = self.linear_2(x)
        return x


def make_dataset(n: int, dim: int, seed: int = 0) -> torch.utils.data.TensorDataset:
    """Random inputs; the label of a row is the argmax of a fixed random projection (learnable)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    label = (x @ torch.randn(dim, dim, generator=g)).argmax(-1)
    return torch.utils.data.TensorDataset(x, label)


def train(dim: int = 1024, hidden: int = 16384, steps: int = 10, batch_size: int = 16, lr: float = 0.05) -> list[float]:
    """The quick start after ``launch``: returns this rank's losses."""
    torch.manual_seed(0)  # the same initial weights on every rank
    model = MLP_2D(dim, hidden)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    criterion = nn.CrossEntropyLoss()
    dataset = make_dataset(steps * batch_size * 4, dim)
    train_dataloader = mt.get_dataloader(dataset=dataset, shuffle=True, batch_size=batch_size)
    engine, train_dataloader, _, _ = mt.initialize(model=model, optimizer=optimizer, criterion=criterion,
                                                   train_dataloader=train_dataloader)
    engine.train()
    losses = []
    for data, label in train_dataloader:
        engine.zero_grad()
        output = engine(data)
        loss = engine.criterion(output, label)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
        if len(losses) == steps:
            break
    return losses


def main(argv: list[str] | None = None) -> list[float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=16, help="per data rank")
    args = ap.parse_args(argv)
    ctx = mt.launch_from_torch(config=CONFIG)
    losses = train(args.dim, args.hidden, args.steps, args.batch_size)
    if ctx.rank == 0:
        print("losses:", " ".join(f"{v:.4f}" for v in losses), flush=True)
    return losses


if __name__ == "__main__":
    main()  # launch tears the process group down at exit
