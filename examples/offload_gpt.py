"""Train a GPT whose parameters and optimizer state do not fit the device (meshpar.memory).

    python examples/offload_gpt.py                 # CPU: a simulated device of --budget-kib KiB
    python examples/offload_gpt.py --cuda          # a real GPU (bf16 compute, fp32 master weights)

The model is built on the meta device (no memory), its parameters are packed into chunks and
initialised chunk by chunk; activation checkpointing and the chunk manager are applied from
outside; the loss matches plain torch AdamW (checked on the CPU, where both run in float32).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import meshpar.memory as mm
from meshpar.models.gpt import GPT, Block, GPTConfig


def gpt_blocks(cfg: GPTConfig) -> torch.nn.Sequential:
    """``[embed, layer 0..L-1, head]`` with parameters on the meta device."""
    with torch.device("meta"):
        return GPT(cfg).pipeline_blocks()


def init(name: str, t: torch.Tensor) -> None:
    """Deterministic per-name init (the same values however the parameters are chunked)."""
    g = torch.Generator(device=t.device).manual_seed(sum(map(ord, name)))
    with torch.no_grad():
        if ".ln_" in name:
            t.fill_(1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("bias"):
            t.zero_()
        else:
            t.normal_(0.0, 0.02, generator=g)


def batch(step: int, cfg: GPTConfig, B: int, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    idx = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g)
    return idx[:, :-1].to(device), idx[:, 1:].to(device)


def loss_of(blocks, idx, tgt):
    return F.cross_entropy(blocks(idx).float().flatten(0, 1), tgt.flatten())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cuda", action="store_true")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--budget-kib", type=int, default=1600, help="simulated device size (CPU)")
    ap.add_argument("--memory", default="auto", choices=["auto", "host", "device"])
    args = ap.parse_args()
    cfg = GPTConfig(vocab_size=256, block_size=32, n_layer=4, n_head=4, n_embd=64)
    B, T = 4, 32

    blocks = gpt_blocks(cfg)
    mm.checkpoint_activations(blocks, "block", blocks=lambda name, m: isinstance(m, Block))
    if args.cuda:
        off = mm.offload(blocks, units=list(blocks), memory=args.memory, device="cuda", init=init,
                         compute_dtype=torch.bfloat16, master_dtype=torch.float32, lr=1e-3, weight_decay=0.0)
        device = torch.device("cuda")
    else:
        off = mm.offload(blocks, units=list(blocks), memory=args.memory, device="simulated",
                         device_budget=args.budget_kib * 1024, init=init, lr=1e-3, weight_decay=0.0)
        device = torch.device("cpu")
    losses = []
    for step in range(args.steps):
        idx, tgt = batch(step, cfg, B, T, device)
        loss = loss_of(blocks, idx, tgt)
        loss.backward()                 # chunks come to the device unit by unit; grads fill the chunks
        off.step()                      # GPU/CPU AdamW per chunk (most already ran during the backward)
        losses.append(float(loss.detach()))
        print(f"step {step}: loss {losses[-1]:.4f}")
    print(mm.report(off))

    if not args.cuda:                   # the same training with every tensor in plain memory
        from meshpar.pipeline import materialize
        ref = gpt_blocks(cfg)
        materialize(ref, "cpu", init=init)
        opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.0)
        for step in range(args.steps):
            idx, tgt = batch(step, cfg, B, T, device)
            opt.zero_grad()
            loss = loss_of(ref, idx, tgt)
            loss.backward()
            opt.step()
            assert abs(float(loss.detach()) - losses[step]) < 1e-4, (step, float(loss.detach()), losses[step])
        print("matches torch AdamW without offload: True")
    off.close()


if __name__ == "__main__":
    main()
