"""Cheap single-process checks: sampler sharding/resume, launch errors, the CLI, TokenDataset."""
from __future__ import annotations

import pytest
import torch

from meshpar.train import ShardedSampler, TokenDataset, launch_from_slurm, launch_from_torch
from meshpar.train.cli import check, main


def test_sampler_disjoint_deterministic_and_resumable():
    ds = list(range(50))
    shards = [list(ShardedSampler(ds, 4, r, seed=5, batch_size=3)) for r in range(4)]
    flat = [i for s in shards for i in s]
    assert len(flat) == len(set(flat)) == 4 * 12  # 50 // 4 = 12 per rank (a multiple of the batch)
    assert shards == [list(ShardedSampler(ds, 4, r, seed=5, batch_size=3)) for r in range(4)]
    s = ShardedSampler(ds, 4, 1, seed=5, batch_size=3)
    s.set_epoch(2)
    full = list(s)
    assert full != shards[1]  # a new epoch reshuffles
    s.load_state_dict({"epoch": 2, "consumed": 6})
    assert list(s) == full[6:] and list(s) == full  # resumes mid-epoch once, then starts over
    with pytest.raises(ValueError, match="too small"):
        ShardedSampler(list(range(3)), 4, 0)


def test_token_dataset():
    ds = TokenDataset(torch.arange(20), block_size=4)
    x, y = ds[1]
    assert x.tolist() == [4, 5, 6, 7] and y.tolist() == [5, 6, 7, 8] and len(ds) == 4
    with pytest.raises(ValueError, match="too few"):
        TokenDataset(torch.arange(3), block_size=4)


def test_launch_errors_without_environment(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NPROCS"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        launch_from_torch({})
    with pytest.raises(RuntimeError, match="srun"):
        launch_from_slurm({}, "127.0.0.1", 1234)


def test_cli_check_and_help(capsys):
    rep = check()
    assert rep["torch"] == torch.__version__ and rep["gloo"] == "True" and "cuda ops" in rep
    assert main(["check"]) == 0 and "torch" in capsys.readouterr().out
    assert main(["run", "--help"]) == 0 and "nproc-per-node" in capsys.readouterr().out
