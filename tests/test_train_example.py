"""End-to-end: the GPT main job (examples/gpt/train.py) for a few steps in each mode, on the pool."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "gpt"


def _run_example(mesh, mode: str, out: str, steps: int = 12):
    sys.path.insert(0, str(EXAMPLE))
    import train  # examples/gpt/train.py

    from meshpar.train import context_for

    cfg = str(EXAMPLE / "configs" / (f"{mode}.toml" if mode == "zero" else f"{mode}.py"))
    sets = [f"train.steps={steps}", "train.progress=False", "log.every=4", "train.sample_tokens=4",
            "train.warmup=2", "model.n_layer=1", "model.n_embd=32", "model.block_size=32", "data.max_bytes=200000",
            "checkpoint.every=0", "optimizer.lr=1e-2"]
    args = ["--config", cfg, "--out", out] + [a for s in sets for a in ("--set", s)]
    ctx = context_for(cfg, mesh=mesh, overrides=train.overrides(sets))
    return train.main(args, ctx=ctx)


@pytest.mark.parametrize("mode,shape,names", [
    ("2d", (1, 2, 2), ("data", "x", "y")),
    ("1d", (1, 4), ("data", "tp")),
    ("dense", (4,), ("data",)),
    ("zero", (4,), ("data",)),  # ZeRO-2, bf16 compute, gradient accumulation 2, from TOML
    ("pipe", (2, 2), ("pipe", "data")),  # pipeline 2 x data 2, 1F1B over GPT.pipeline_blocks()
    # 8-rank example runs (about a minute each on 2 cores): under `-m thorough`; the same plans are checked
    # against dense training in tests/test_batch_contract.py and tests/test_gpt.py in every run
    pytest.param("3d", (1, 2, 2, 2), ("data", "i", "j", "k"), marks=pytest.mark.thorough),
    pytest.param("2.5d", (1, 2, 2, 2), ("data", "d", "x", "y"), marks=pytest.mark.thorough),
])
def test_example_loss_falls(pool, tmp_path, mode, shape, names):
    if pool.world_size < 8 and len(shape) == 4:
        pytest.skip("needs an 8-rank pool (MESHPAR_TEST_WORLD=8)")
    res = pool.run(_run_example, shape, names, mode, str(tmp_path / mode))
    losses = res[0]["losses"]
    assert len(losses) == 12
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(r["losses"] == losses for r in res)  # every rank reports the same data-averaged loss
    assert (tmp_path / mode / "loss.png").stat().st_size > 1000
    assert (tmp_path / mode / "model.safetensors").exists()
    rows = [json.loads(line) for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kind"] == "train" and "tokens_per_s" in rows[0]
    assert res[0]["sample"].startswith("def ")


def test_example_pipeline_resumes_and_exports_gpt_names(pool, tmp_path):
    """The pipelined job's checkpoint resumes (more steps), and its exported weights are the GPT's."""
    from safetensors.torch import load_file

    from meshpar.models.gpt import GPT, GPTConfig

    out = str(tmp_path / "pipe")
    first = pool.run(_run_example, (2, 2), ("pipe", "data"), "pipe", out, 6)[0]["losses"]
    again = pool.run(_run_example, (2, 2), ("pipe", "data"), "pipe", out, 8)[0]["losses"]
    assert len(first) == 6 and len(again) == 2  # resumed at step 6
    rows = [json.loads(line) for line in (tmp_path / "pipe" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 9))
    weights = load_file(str(tmp_path / "pipe" / "model.safetensors"))
    gpt = GPT(GPTConfig(vocab_size=256, block_size=32, n_layer=1, n_head=4, n_embd=32))
    shapes = {n: tuple(p.shape) for n, p in gpt.named_parameters()}
    assert {k: tuple(v.shape) for k, v in weights.items()} == shapes
