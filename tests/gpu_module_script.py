"""The module path on one GPU (run by ``tests/test_gpu.py`` in a subprocess: one NCCL rank).

For each plan (``dense``, ``dp``, ``1d``, ``2d``, ``2.5d``, ``3d`` on size-1 axes): meshpar's plain GPT is
built in fp32 on the CPU, laid out by the config's plan, moved to the GPU by ``initialize`` and trained
through the engine.

* fp32: three AdamW steps; losses (relative 1e-5) and final parameters (1e-4: Adam normalises rounding differences) equal the dense plan's.
* bf16 (``precision="bf16"``: bf16 compute copy, fp32 master): three steps, losses within 2e-2 of fp32.
* host syncs: after two warm-up steps, two bf16 steps run under ``torch.cuda.set_sync_debug_mode``
  (``error``: the first sync raises; ``warn``: every sync's stack is printed, deduplicated).

Prints ``MODULE OK <mode>`` per plan; exits non-zero on the first failure.

    python tests/gpu_module_script.py dense,1d,2d error
"""
from __future__ import annotations

import os
import socket
import sys
import traceback
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import meshpar as mp  # noqa: E402
import meshpar.train as mt  # noqa: E402
from meshpar.models.gpt import GPT, GPTConfig  # noqa: E402

CFG = GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=4, n_embd=64)


def tensor_of(mode: str):
    if mode in ("dense", "dp"):
        return None
    return dict(size=1, mode=mode, **({"depth": 1} if mode == "2.5d" else {}))


def engine_for(mode: str, precision: str):
    cfg = dict(parallel=dict(tensor=tensor_of(mode)), zero=dict(stage=1 if mode == "dp" else 0),
               precision=precision, seed=0)
    ctx = mt.context_for(cfg)
    model = mt.parallelize_model(GPT(CFG, seed=0), ctx)
    engine, *_ = mt.initialize(model, torch.optim.AdamW(model.parameters(), lr=1e-3), None, ctx=ctx)
    return engine, model, ctx


def batch(step: int, device):
    g = torch.Generator().manual_seed(100 + step)
    t = torch.randint(0, CFG.vocab_size, (4, CFG.block_size + 1), generator=g)
    return t[:, :-1].to(device), t[:, 1:].to(device)


def one_step(engine, step: int, device) -> torch.Tensor:
    x, y = batch(step, device)
    engine.zero_grad()
    loss = engine(x, y)
    loss = mp.unshard(loss) if isinstance(loss, mp.ShardedTensor) else loss
    engine.backward(loss)
    engine.step()
    return loss.detach()


def train(mode: str, precision: str, steps: int = 3):
    engine, model, ctx = engine_for(mode, precision)
    for p in model.parameters():
        assert p.device == ctx.device, f"{mode}: a parameter is on {p.device}, the context's device is {ctx.device}"
    losses = [float(one_step(engine, i, ctx.device)) for i in range(steps)]
    params = {k: (mp.unshard(p) if isinstance(p, mp.ShardedTensor) else p).detach().float().cpu()
              for k, p in model.named_parameters()}
    return losses, params, engine, ctx


def check_syncs(engine, ctx, how: str) -> list[str]:
    stacks: dict[str, int] = {}

    def show(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "meshpar" in f.filename or "torch/optim" in f.filename]
        key = "\n".join(f"    {f.filename.split('/meshpar/')[-1]}:{f.lineno} {f.name}: {f.line}" for f in frames[-6:])
        stacks[key] = stacks.get(key, 0) + 1

    old = warnings.showwarning
    warnings.showwarning = show
    try:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode(how)
        for i in range(2):
            one_step(engine, 10 + i, ctx.device)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = old
    return [f"  {n}x at\n{k}" for k, n in stacks.items()]


def main() -> None:
    modes = sys.argv[1].split(",") if len(sys.argv) > 1 else ["dense", "dp", "1d", "2d", "2.5d", "3d"]
    how = sys.argv[2] if len(sys.argv) > 2 else "error"
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(s.getsockname()[1]))
    cuda = torch.cuda.is_available()  # on a CPU machine the same checks run on gloo, without the sync part
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if cuda else "gloo")
    ref_losses, ref_params, *_ = train("dense", "fp32")
    failed = []
    for mode in modes:
        try:
            losses, params, *_ = train(mode, "fp32")
            for a, b in zip(losses, ref_losses):
                assert abs(a - b) <= 1e-5 * abs(b), f"{mode} fp32 loss {losses} vs dense {ref_losses}"
            for k, v in ref_params.items():
                if k.endswith("attn.k.bias"):  # its exact gradient is 0 (softmax ignores a per-query constant):
                    continue                   # Adam's m/sqrt(v) turns rounding noise into +-lr steps
                err = float((params[k] - v).norm() / v.norm().clamp_min(1e-30))
                assert err <= 1e-4, f"{mode} fp32: parameter {k} after 3 steps differs from dense by {err:.2e}"
            bl, _, engine, ctx = train(mode, "bf16")
            for a, b in zip(bl, ref_losses):
                assert abs(a - b) <= 2e-2 * abs(b), f"{mode} bf16 loss {bl} vs fp32 dense {ref_losses}"
            syncs = check_syncs(engine, ctx, how) if cuda else []
            if syncs:
                print(f"SYNCS {mode}: {len(syncs)} places\n" + "\n".join(syncs), flush=True)
                if how == "error":
                    raise AssertionError(f"{mode}: host syncs in a training step")
            print(f"MODULE OK {mode} fp32 losses {losses} bf16 {bl}", flush=True)
        except Exception as e:  # report every plan, fail at the end
            failed.append(mode)
            print(f"MODULE FAIL {mode}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
    dist.destroy_process_group()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
