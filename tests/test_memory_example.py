"""The offload example and the benchmark's CPU smoke mode run end to end (and check their own losses)."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args: list[str]) -> str:
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return p.stdout


def test_offload_example():
    out = _run(["examples/offload_gpt.py", "--steps", "3"])
    assert "matches torch AdamW without offload: True" in out
    assert "exp_avg_sq" in out


def test_offload_bench_smoke(tmp_path):
    out = _run(["bench/offload.py", "--smoke", "--out", str(tmp_path)])
    assert "smoke: max |loss(meshpar) - loss(torch AdamW)|" in out
    assert any(f.suffix == ".png" for f in tmp_path.iterdir())
