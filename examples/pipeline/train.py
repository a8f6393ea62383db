"""Train a small GPT-like stack with pipeline parallelism (optionally x data parallelism).

CPU, gloo, 4 processes::

    torchrun --nproc-per-node 4 examples/pipeline/train.py                       # pipe=4, 1F1B
    torchrun --nproc-per-node 4 examples/pipeline/train.py --pipe 2 --data 2 --schedule interleaved

Every rank builds the same list of blocks (same seed); the Pipeline keeps only its own stages.
Every rank reads the same batch; the first stage uses the tokens, the last stage the targets,
and each data replica takes its share of the batch.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import meshpar  # noqa: E402
from meshpar.pipeline import Pipeline  # noqa: E402


class Embed(nn.Module):
    """tokens[b, s] -> x[b, s, h]."""

    def __init__(self, vocab: int, seq: int, h: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, h), nn.Embedding(seq, h)

    def forward(self, t):
        return self.tok(t) + self.pos(torch.arange(t.shape[1]))


class Block(nn.Module):
    """Pre-LN causal transformer block on x[b, s, h]."""

    def __init__(self, h: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.qkv, self.proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.mlp = nn.Sequential(nn.Linear(h, 4 * h), nn.GELU(), nn.Linear(4 * h, h))

    def forward(self, x):
        b, s, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, h))
        return x + self.mlp(self.ln2(x))


def lm_loss(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pipe", type=int, default=4)
    ap.add_argument("--data", type=int, default=1)
    ap.add_argument("--schedule", default="1f1b", choices=["gpipe", "1f1b", "interleaved"])
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    mesh = meshpar.Mesh((a.pipe, a.data), ("pipe", "data"))
    vocab, seq, h, layers = 32, 16, 32, 8
    torch.manual_seed(0)
    blocks = [Embed(vocab, seq, h)] + [Block(h, 4) for _ in range(layers)] + \
             [nn.Sequential(nn.LayerNorm(h), nn.Linear(h, vocab))]
    chunks = 2 if a.schedule == "interleaved" else 1
    pipe = Pipeline(blocks, mesh, lm_loss, schedule=a.schedule, num_microbatches=a.micro, chunks=chunks,
                    partition="parameters")
    opt = torch.optim.AdamW(pipe.parameters(), lr=3e-3)
    # a learnable toy language: token t+1 = (token t + 3) mod vocab
    g = torch.Generator().manual_seed(1)
    for step in range(a.steps):
        start = torch.randint(0, vocab, (8 * a.data, 1), generator=g)
        tokens = (start + 3 * torch.arange(seq + 1)) % vocab
        mine = tokens.chunk(a.data)[mesh.coord("data")]
        opt.zero_grad(set_to_none=True)
        loss = pipe.step(mine[:, :-1], mine[:, 1:])
        opt.step()
        if mesh.rank == 0 and (step % 5 == 0 or step == a.steps - 1):
            print(f"step {step:3d}  loss {float(loss):.4f}")
    if mesh.rank == 0:
        print(f"stages on pipe rank 0: blocks {[list(pipe.block_indices(c)) for c in range(chunks)]}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
