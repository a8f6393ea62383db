"""Fault tolerance: under torchrun --max-restarts, a worker killed mid-run makes the job restart
from the latest checkpoint and finish with the losses of an uninterrupted run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent('''
    import json, os, signal, sys
    import torch, torch.nn as nn
    import meshpar.train as mt

    out, crash_at = sys.argv[1], int(sys.argv[2])
    ctx = mt.launch_from_torch(dict(seed=3, gradient_accumulation=1))
    torch.manual_seed(ctx.seed_for(()))
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g); y = x.sum(1, keepdim=True).sin()
    dl = mt.get_dataloader(torch.utils.data.TensorDataset(x, y), 4, ctx.mesh, seed=1)
    crit = lambda o, t: ((o - t) ** 2).mean()
    engine, dl, _, _ = mt.initialize(model, torch.optim.SGD(model.parameters(), lr=0.1), crit, dl, ctx=ctx)

    class Crash(mt.Hook):
        def after_step(self, trainer, metrics):
            restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
            if restarts == 0 and trainer.step == crash_at and ctx.rank == 1:
                os.kill(os.getpid(), signal.SIGKILL)

    ck = mt.CheckpointHook(os.path.join(out, "ck"), every=2)
    log = mt.MetricLoggerHook(jsonl=os.path.join(out, f"metrics{os.environ['TORCHELASTIC_RESTART_COUNT']}.jsonl"))
    tr = mt.Trainer(engine, [ck, log, Crash()], progress=False)
    losses = tr.fit(dl, max_steps=10)
    if ctx.rank == 0:
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump({"losses": losses, "resumed_from": ck.resumed_from,
                       "restarts": int(os.environ["TORCHELASTIC_RESTART_COUNT"])}, f)
''')


def _torchrun(tmp: Path, out: Path, crash_at: int) -> subprocess.CompletedProcess:
    script = tmp / "job.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    cmd = [sys.executable, "-m", "meshpar.train.cli", "run", "--nproc-per-node", "2", "--max-restarts", "1",
           "--monitor-interval", "0.5", str(script), str(out), str(crash_at)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)


def test_killed_worker_restarts_from_checkpoint(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    p = _torchrun(tmp_path, out, crash_at=5)
    (tmp_path / "log.txt").write_text(p.stdout + p.stderr)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((out / "result.json").read_text())
    assert res["restarts"] == 1 and res["resumed_from"] == 4
    first = [json.loads(line) for line in (out / "metrics0.jsonl").read_text().splitlines()]
    # the first attempt logged steps 1..5 (killed after 5); the restart re-did 5..10 from step 4
    before = {r["step"]: r["loss"] for r in first}
    assert len(res["losses"]) == 6 and max(before) == 5
    assert res["losses"][0] == before[5]  # step 5 recomputed from the checkpoint: same loss, same data
