"""Sharded checkpoints: re-layout on load (2x2 -> 1D 4 -> one process), atomic saves, safetensors export."""
from __future__ import annotations

import multiprocessing as mp
import os

import torch

from meshpar.train.checkpoint import (Block, export_safetensors, latest_checkpoint, load_checkpoint, load_full,
                                      save_checkpoint)

ROWS, COLS = 8, 12


def _global_w() -> torch.Tensor:
    return torch.arange(ROWS * COLS, dtype=torch.float32).reshape(ROWS, COLS) / 7.0


def _loss(w: torch.Tensor) -> float:
    """A 'model' whose loss depends on every element: sum of tanh(w) * position."""
    pos = torch.arange(w.numel(), dtype=torch.float64).reshape(w.shape)
    return float((torch.tanh(w.double()) * pos).sum())


def _save_2d(mesh, root: str) -> float:
    x, y = mesh.coord("x"), mesh.coord("y")
    r, c = ROWS // 2, COLS // 2
    w = _global_w()[x * r:(x + 1) * r, y * c:(y + 1) * c].clone()
    bias = torch.full((3,), 0.5)  # replicated: written once
    save_checkpoint(root, 5, {"model.w": Block(w, (ROWS, COLS), (x * r, y * c)), "model.b": bias},
                    extra={"step": 5, "rank": mesh.rank, "rng": torch.get_rng_state()}, mesh=mesh)
    return _loss(_global_w())


def _load_1d(mesh, root: str) -> tuple[bool, dict, float]:
    t = mesh.coord("tp")
    c = COLS // 4
    w = torch.zeros(ROWS, c)
    b = torch.zeros(3)
    extra = load_checkpoint(latest_checkpoint(root), {"model.w": Block(w, (ROWS, COLS), (0, t * c)), "model.b": b},
                            mesh=mesh)
    ok = torch.equal(w, _global_w()[:, t * c:(t + 1) * c]) and torch.equal(b, torch.full((3,), 0.5))
    # the loss computed from the re-laid blocks: gather the columns over tp
    import torch.distributed as dist
    parts = [torch.zeros_like(w) for _ in range(4)]
    dist.all_gather(parts, w, group=mesh.group("tp"))
    return ok, {k: v for k, v in extra.items() if k != "rng"}, _loss(torch.cat(parts, 1))


def test_reshard_2d_to_1d_to_one_process(pool, tmp_path):
    root = str(tmp_path / "ckpt")
    loss_2d = pool.run(_save_2d, (2, 2), ("x", "y"), root)[0]
    res = pool.run(_load_1d, (4,), ("tp",), root)
    assert all(ok for ok, _, _ in res)
    assert [e["rank"] for _, e, _ in res] == [0, 1, 2, 3]  # same world size: each rank gets its own extra
    assert {lo for _, _, lo in res} == {loss_2d}
    # one process (no torch.distributed world): the full tensor, same loss
    full = load_full(latest_checkpoint(root), "model.")
    assert torch.equal(full["w"], _global_w()) and _loss(full["w"]) == loss_2d
    w = torch.zeros(ROWS, COLS)
    extra = load_checkpoint(latest_checkpoint(root), {"model.w": w, "model.b": torch.zeros(3)})
    assert torch.equal(w, _global_w()) and "rng" not in extra and extra["rank"] == 0
    out = export_safetensors(latest_checkpoint(root), tmp_path / "model.safetensors")
    from safetensors.torch import load_file
    st = load_file(str(out))
    assert torch.equal(st["w"], _global_w()) and set(st) == {"w", "b"}


def _save_then_die(root: str) -> None:
    w = torch.ones(64, 64)
    save_checkpoint(root, 1, {"model.w": w}, extra={"step": 1})
    save_checkpoint(root, 2, {"model.w": w * 2}, extra={"step": 2}, _after_write=lambda: os._exit(13))


def test_kill_during_save_keeps_previous(tmp_path):
    root = str(tmp_path / "ckpt")
    p = mp.get_context("spawn").Process(target=_save_then_die, args=(root,))
    p.start()
    p.join(60)
    assert p.exitcode == 13
    assert (tmp_path / "ckpt" / "step_00000002.tmp").exists()  # the killed save's leftovers
    last = latest_checkpoint(root)
    assert last is not None and last.name == "step_00000001"
    w = torch.zeros(64, 64)
    assert load_checkpoint(last, {"model.w": w})["step"] == 1
    assert torch.equal(w, torch.ones(64, 64))
    # the next save of step 2 cleans the leftovers and becomes the latest
    save_checkpoint(root, 2, {"model.w": w * 3}, extra={"step": 2})
    assert latest_checkpoint(root).name == "step_00000002"
    assert not (tmp_path / "ckpt" / "step_00000002.tmp").exists()


def test_keep_prunes_old(tmp_path):
    for s in range(4):
        save_checkpoint(tmp_path, s, {"a": torch.full((2,), float(s))}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000003"]
