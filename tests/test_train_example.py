"""End-to-end: the GPT main job (examples/gpt/train.py) for a few steps in each mode, on the pool."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "gpt"


def _run_example(mesh, mode: str, out: str):
    sys.path.insert(0, str(EXAMPLE))
    import train  # examples/gpt/train.py

    from meshpar.train import context_for

    cfg = str(EXAMPLE / "configs" / (f"{mode}.toml" if mode == "zero" else f"{mode}.py"))
    sets = ["train.steps=12", "train.progress=False", "log.every=4", "train.sample_tokens=4", "train.warmup=2",
            "model.n_layer=1", "model.n_embd=32", "model.block_size=32", "data.max_bytes=200000",
            "checkpoint.every=0", "optimizer.lr=1e-2"]
    args = ["--config", cfg, "--out", out] + [a for s in sets for a in ("--set", s)]
    ctx = context_for(cfg, mesh=mesh, overrides=train.overrides(sets))
    return train.main(args, ctx=ctx)


@pytest.mark.parametrize("mode,shape,names", [
    ("2d", (1, 2, 2), ("data", "x", "y")),
    ("1d", (1, 4), ("data", "tp")),
    ("dense", (4,), ("data",)),
    ("zero", (4,), ("data",)),  # ZeRO-2, bf16 compute, gradient accumulation 2, from TOML
    pytest.param("3d", (1, 2, 2, 2), ("data", "i", "j", "k"), marks=pytest.mark.slow),
    pytest.param("2.5d", (1, 2, 2, 2), ("data", "d", "x", "y"), marks=pytest.mark.slow),
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
