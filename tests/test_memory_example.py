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


def test_offload_bench_smoke_runs(tmp_path, monkeypatch, capsys):
    """bench/offload.py --smoke, one run per mode in this process (the driver adds only subprocesses):
    meshpar on a simulated budget that moves chunks equals torch AdamW, and the memory plot is drawn."""
    import importlib.util
    import json
    spec = importlib.util.spec_from_file_location("bench_offload", os.path.join(ROOT, "bench", "offload.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = []
    for mode in ("meshpar", "torch"):
        monkeypatch.setattr(sys, "argv", ["offload.py", "--smoke", "--run", mode, "--size", "tiny"])
        bench.main()
        line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("RESULT ")][0]
        results.append(json.loads(line[7:]))
    a, b = results
    assert max(abs(x - y) for x, y in zip(a["losses"], b["losses"])) < 1e-4
    assert a["placement"]["moves"]["uploads"] > a["placement"]["chunks"]
    bench.plot(results, str(tmp_path / "m.png"))
    assert (tmp_path / "m.png").stat().st_size > 0
