"""Colossal-AI's quick start as written (examples/quickstart_colossal.py): launch sets the context,
``get_dataloader``/``initialize`` need no mesh or ctx, ``Linear2D`` places its own input, and the
engine's losses equal dense training of the same MLP on the global batch."""
from __future__ import annotations

import contextvars
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
DIM, HIDDEN, STEPS, BATCH = 16, 32, 4, 4


def _quickstart(rank: int, world: int):
    sys.path.insert(0, str(EXAMPLES))
    import quickstart_colossal as qs

    import meshpar.nn as mnn
    from meshpar.train import ShardedSampler, current_context, launch

    def body():
        # the world already exists in the pool: launch validates it and builds the config's mesh
        ctx = launch(config=qs.CONFIG, rank=rank, world_size=world, host="127.0.0.1", port=29500, backend="gloo")
        assert current_context() is ctx
        got = qs.train(DIM, HIDDEN, STEPS, BATCH)
        data, seed = ctx.mesh.size("data"), ctx.config.seed
        return got, data, seed

    # a copied context: the launch's context (and default mesh) do not leak into later tests of the pool
    got, data, seed = contextvars.copy_context().run(body)
    # dense reference: the same MLP (same init), SGD on the global batch of every step
    ds = qs.make_dataset(STEPS * BATCH * 4, DIM)
    dense = torch.nn.Sequential(mnn.Linear(DIM, HIDDEN), mnn.Linear(HIDDEN, DIM))
    opt = torch.optim.SGD(dense.parameters(), lr=0.05)
    orders = [list(ShardedSampler(ds, data, r, shuffle=True, seed=seed, batch_size=BATCH)) for r in range(data)]
    want = []
    for s in range(STEPS):
        idx = [i for r in range(data) for i in orders[r][s * BATCH:(s + 1) * BATCH]]
        x, y = ds.tensors[0][idx], ds.tensors[1][idx]
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(dense(x), y)
        loss.backward()
        opt.step()
        want.append(loss.item())
    return got, want


def test_quickstart_matches_dense(pool):
    for got, want in pool.run(_quickstart, None):
        assert len(got) == STEPS
        assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4, (got, want)


def test_quickstart_script_runs_as_written(tmp_path):
    """``torchrun --nproc-per-node 4 examples/quickstart_colossal.py`` (small sizes); every process exits 0."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           str(EXAMPLES / "quickstart_colossal.py"), "--dim", "16", "--hidden", "32", "--steps", "3"]
    r = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "losses:" in r.stdout
    assert "terminate called" not in r.stderr
