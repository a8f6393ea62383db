"""Train a small GPT with meshpar from a config file (the main job).

    meshpar run --nproc-per-node 4 examples/gpt/train.py --config examples/gpt/configs/2d.py
    meshpar run --nproc-per-node 4 examples/gpt/train.py --config examples/gpt/configs/pipe.py

Any config key can be overridden: ``--set train.steps=50 --set model.n_layer=2``.
Without torchrun (``python examples/gpt/train.py --config ...``) it runs as one process.
Writes ``<out>/metrics.jsonl``, ``<out>/loss.png``, checkpoints in ``<out>/ckpt`` (resumed
automatically) and ``<out>/model.safetensors``; prints a generated sample at the end.

With ``parallel.pipeline > 1`` the engine splits the GPT into its pipeline blocks
(``GPT.pipeline_blocks()``: embedding, transformer layers, final norm + LM head) and runs each
step with ``pipeline_schedule``; parameter names, checkpoints and exported weights are the
GPT's own. Sampling runs on the whole GPT after ``engine.gather_model()`` has copied every
stage's trained weights to every rank.
"""
from __future__ import annotations

import argparse
import ast
import math
import os
import socket
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import decode, load_tokens  # noqa: E402

import meshpar.train as mt  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import meshpar as mp  # noqa: E402
from meshpar.models.gpt import GPT, GPTConfig  # noqa: E402
from meshpar.models.plans import place_batch  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="a .py or .toml config (see docs/config.md)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a dotted config key")
    ap.add_argument("--out", default=None, help="output folder (default: out/gpt-<config name>)")
    return ap.parse_args(argv)


def overrides(pairs: list[str]) -> dict:
    out = {}
    for p in pairs:
        k, _, v = p.partition("=")
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def start(config: str, ov: dict) -> mt.Context:
    if "RANK" in os.environ:
        return mt.launch_from_torch(config, overrides=ov)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return mt.launch(config, rank=0, world_size=1, port=port, overrides=ov)


def gpt_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits ``[B, T, V]`` (possibly sharded) over targets != -1; a plain scalar.

    Sharded logits: the targets (this data rank's block, placed by the engine) take the logits'
    batch/sequence layout (a free local slice), and the loss is vocab-parallel."""
    if isinstance(logits, mp.ShardedTensor):
        spec = mp.P(*(logits.spec[i] if i < len(logits.spec) else None for i in range(2)))
        # a plain tensor is this data rank's local batch (the batch contract); a ShardedTensor is resharded
        targets = place_batch(targets, spec, logits.mesh, ("data",) if "data" in logits.mesh.names else ())
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)
    return mp.unshard(loss) if isinstance(loss, mp.ShardedTensor) else loss


def micro_step(engine: mt.Engine, batch) -> torch.Tensor:
    """One micro-batch (with a pipeline the whole schedule runs here: ``engine.train_batch``)."""
    x, y = batch
    x, y = x.to(engine.ctx.device), y.to(engine.ctx.device)
    if engine.pipeline is not None:
        return engine.train_batch((x, y))
    loss = engine.criterion(engine(x), y)
    engine.backward(loss)
    return loss.detach()


def lr_lambda(warmup: int, total: int, min_ratio: float = 0.1):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def main(argv=None, ctx: mt.Context | None = None) -> dict:
    """Run the job; ``ctx`` (e.g. from ``meshpar.train.context_for``) skips launching."""
    args = parse_args(argv)
    if ctx is None:
        ctx = start(args.config, overrides(args.set))
    cfg, mesh = ctx.config, ctx.mesh
    train_cfg, model_cfg, data_cfg = cfg.section("train"), cfg.section("model"), cfg.section("data")
    out = Path(args.out or f"out/gpt-{Path(args.config).stem}")
    steps = int(train_cfg.get("steps", 200))
    tokens, vocab = load_tokens(data_cfg.get("path", "stdlib"), int(data_cfg.get("max_bytes", 2_000_000)))
    block = int(model_cfg.get("block_size", 64))
    split = int(len(tokens) * 0.9)
    train_ds = mt.TokenDataset(tokens[:split], block)
    val_ds = mt.TokenDataset(tokens[split:], block)
    per_rank = int(train_cfg.get("batch_size", 8)) // mesh.size("data")
    train_dl = mt.get_dataloader(train_ds, per_rank, mesh, seed=cfg.seed)
    val_dl = mt.get_dataloader(val_ds, per_rank, mesh, shuffle=False)

    gcfg = GPTConfig(vocab_size=vocab, block_size=block, n_layer=int(model_cfg.get("n_layer", 2)),
                     n_head=int(model_cfg.get("n_head", 4)), n_embd=int(model_cfg.get("n_embd", 64)),
                     dropout=float(model_cfg.get("dropout", 0.0)), bias=bool(model_cfg.get("bias", True)))
    model = mt.parallelize_model(GPT(gcfg, seed=cfg.seed), ctx)  # the config's layout, applied from outside
    opt_cfg = cfg.section("optimizer")
    lr = float(opt_cfg.get("lr", 3e-3))
    # a factory: with a pipeline each rank optimizes only its stages' parameters
    optimizer = lambda params: torch.optim.AdamW(  # noqa: E731
        params, lr=lr, betas=tuple(opt_cfg.get("betas", (0.9, 0.95))),
        weight_decay=float(opt_cfg.get("weight_decay", 0.0)))
    sched = lambda o: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(int(train_cfg.get("warmup", 10)), steps))  # noqa
    engine, train_dl, val_dl, _ = mt.initialize(model, optimizer, gpt_loss, train_dl, val_dl,
                                                lr_scheduler=sched, ctx=ctx)
    n_params = sum(p.numel() for p in model.parameters())
    flops_per_token = 6 * n_params + 12 * gcfg.n_layer * block * gcfg.n_embd
    ck = cfg.section("checkpoint")
    logger = mt.MetricLoggerHook(every=int(cfg.section("log").get("every", 10)), jsonl=out / "metrics.jsonl",
                                 tensorboard=cfg.section("log").get("tensorboard"))
    hooks = [mt.ThroughputHook(flops_per_token), logger,
             mt.CheckpointHook(ck.get("dir", out / "ckpt"), every=int(ck.get("every", 50)),
                               resume=bool(ck.get("resume", True)), export=out / "model.safetensors")]
    trainer = mt.Trainer(engine, hooks, step_fn=micro_step, progress=bool(train_cfg.get("progress", True)))
    losses = trainer.fit(train_dl, max_steps=steps, test_dataloader=val_dl,
                         eval_every=int(train_cfg.get("eval_every", 0)), eval_batches=4)
    val = trainer.evaluate(val_dl, max_batches=4)
    rows = cfg.parallel.batch_split()  # the batch dimension is sharded over these ranks: one row each
    prompt = torch.tensor([list(b"def ")] * rows, dtype=torch.long)
    engine.eval()
    model = engine.gather_model()  # the whole GPT on every rank (with a pipeline: every stage's weights)
    model.eval()
    multiple = cfg.parallel.sequence_size  # a split sequence must divide
    sample = model.generate(prompt, int(train_cfg.get("sample_tokens", 100)), temperature=0.8, top_k=20, seed=0,
                            multiple=multiple, gather=mp.unshard)
    result = {"losses": losses, "val_loss": val, "sample": decode(sample[0].tolist(), vocab), "mesh": repr(mesh)}
    if ctx.rank == 0:
        curve = read_curve(out / "metrics.jsonl")  # the whole run, including steps before a resume
        plot_losses(sorted(curve), [curve[k] for k in sorted(curve)], out / "loss.png", repr(mesh))
        if not losses:
            print(f"already trained to step {trainer.step} (checkpoints in {ck.get('dir', out / 'ckpt')}); "
                  f"raise train.steps, or pass --set checkpoint.resume=False to train again")
        print(f"\nfinal val loss {val:.4f}; loss curve {out / 'loss.png'}; weights {out / 'model.safetensors'}")
        print("---- sample ----\n" + result["sample"] + "\n----------------", flush=True)
    return result


def read_curve(path: Path) -> dict[int, float]:
    """``{step: train loss}`` from a metrics JSONL file."""
    import json

    curve: dict[int, float] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row.get("kind") == "train":
                curve[int(row["step"])] = float(row["loss"])
    return curve


def plot_losses(steps: list[int], losses: list[float], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, losses)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_title(f"GPT on {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
