"""meshpar's plain GPT with sequence parallelism ("sp", "1d+sp", with/without "data") applied by
``parallelize`` equals dense (float64): loss, every parameter gradient and the parameters after
AdamW steps; ring and all-to-all attention, contiguous and balanced (zigzag) layouts."""
from __future__ import annotations

import pytest
import torch

import meshpar as mp
from meshpar.errors import ShardingError
from meshpar.models.gpt import GPTConfig
from meshpar.models.plans import parallel_plan
from meshpar.parallel import parallelize
from test_gpt import _steps, build, data, local

CFG = dict(vocab_size=40, block_size=16, n_layer=2, n_head=4, n_embd=16)

# case -> (mode, mesh shape, mesh names, sequence_mode, balanced)
CASES = {
    "sp2-ring": ("sp", (2,), ("sp",), "ring", False),
    "sp4-ring": ("sp", (4,), ("sp",), "ring", False),
    "sp4-ring-balanced": ("sp", (4,), ("sp",), "ring", True),
    "sp4-a2a": ("sp", (4,), ("sp",), "all_to_all", False),
    "sp2xtp2-ring": ("1d+sp", (2, 2), ("sp", "tp"), "ring", False),
    "sp2xtp2-a2a-balanced": ("1d+sp", (2, 2), ("sp", "tp"), "all_to_all", True),
    "data2xsp2-ring-balanced": ("sp", (2, 2), ("data", "sp"), "ring", True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gpt_sp_matches_dense(pool, case):
    mode, shape, names, seq_mode, balanced = CASES[case]
    cfg = GPTConfig(**CFG)
    out = pool.run(_steps, shape, names, mode, cfg, 3, 2, 4, 8, dict(balanced=balanced), seq_mode)
    for errs, _ in out:
        assert errs["loss"] < 1e-10 and errs["grad"] < 1e-9 and errs["param"] < 1e-9, errs


def _generate(mesh, cfg, seed, balanced):
    model = build(cfg, seed)
    parallelize(model, mesh, parallel_plan("gpt", "sp", balanced=balanced))
    idx, _ = data(cfg, 2, 3, seed)
    m = mesh.size("sp") * (2 if balanced else 1)
    return model.generate(idx, 4, temperature=0.0, seed=seed, multiple=m, gather=mp.unshard)


@pytest.mark.parametrize("balanced", [False, True])
def test_generate_sp_matches_dense(pool, balanced):
    cfg = GPTConfig(**CFG)
    idx, _ = data(cfg, 2, 3, 1)
    # greedy: sampled continuations can differ where the logits differ in the last bit (balanced layout)
    ref = build(cfg, 1).generate(idx, 4, temperature=0.0, seed=1)
    out = pool.run(_generate, (2,), ("sp",), cfg, 1, balanced)
    assert all(torch.equal(o, ref) for o in out)


def _bad_length(mesh, cfg):
    model = build(cfg, 0)
    parallelize(model, mesh, parallel_plan("gpt", "sp"))
    idx, tg = data(cfg, 2, 6, 0)  # 6 is not a multiple of sp = 4
    try:
        model(idx, tg)
    except ShardingError as e:
        return str(e)
    return None


def test_sp_bad_inputs(pool):
    msg = pool.run(_bad_length, (4,), ("sp",), GPTConfig(**CFG))[0]
    assert msg is not None and "divisible" in msg
    with pytest.raises(ShardingError, match="does not split the sequence"):
        parallel_plan("gpt", "1d", balanced=True)
