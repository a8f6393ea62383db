"""The one harness every benchmark shares: argument parsing with ``--smoke``/``--out``, CPU smoke
mode on gloo processes, timing (CUDA events or a synchronized clock; median; max over ranks),
correctness checks before timing, environment info and results output (JSON under ``$OUT`` when set,
else ``bench/results/``), and a plain-text table.

    from common import base_parser, bench, check, env_info, write_json   # inside bench/
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

RESULTS = Path(__file__).resolve().parent / "results"


def base_parser(doc: str | None, smoke_help: str = "tiny sizes on CPU: checks the script, not the speed") -> argparse.ArgumentParser:
    """An ArgumentParser with the flags every benchmark has: ``--smoke`` and ``--out``."""
    p = argparse.ArgumentParser(description=(doc or "").strip().split("\n")[0])
    p.add_argument("--smoke", action="store_true", help=smoke_help)
    p.add_argument("--out", default=None, help="results path or folder (default: $OUT, else bench/results/)")
    return p


def results_dir(out: str | None = None) -> Path:
    """Where results go: ``out`` when given, else ``$OUT`` when set, else ``bench/results/``."""
    d = Path(out) if out else Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS
    d.mkdir(parents=True, exist_ok=True)
    return d


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def time_fn(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median seconds of ``iters`` runs of ``fn`` after ``warmup`` runs, max over ranks."""
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        dist.barrier()
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    t = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def check(name: str, got: torch.Tensor, ref: torch.Tensor, tol: float = 3e-2) -> float:
    """Raise when ``got`` is not ``ref`` to bf16 accuracy (never time a wrong result)."""
    e = rel_err(got, ref)
    if not e < tol:
        raise AssertionError(f"{name}: relative error {e:.3g} vs the one-device result exceeds {tol}")
    return e


def env_info() -> dict:
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "world_size": dist.get_world_size(), "backend": dist.get_backend(),
        "torch": torch.__version__,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "host": socket.gethostname(),
    }


def write_json(name: str, payload: dict, out: str | None = None) -> str:
    """Write ``payload`` as JSON: to ``out`` when it names a ``.json`` file, else to
    ``<results_dir(out)>/<name>_<date>.json``. Returns the path."""
    if out and out.endswith(".json"):
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
    else:
        path = results_dir(out) / f"{name}_{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    return str(path)


def spawn_smoke(main: Callable[[argparse.Namespace], None], args: argparse.Namespace, world: int) -> None:
    """Run ``main(args)`` on ``world`` local gloo processes (the ``--smoke`` mode)."""
    import torch.multiprocessing as tmp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp.spawn(_smoke_worker, args=(world, port, main, args), nprocs=world, join=True)


def _smoke_worker(rank: int, world: int, port: int, main, args) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        main(args)
    finally:
        dist.destroy_process_group()


def init_torchrun() -> None:
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def fwd_bwd(forward: Callable[[], object], leaves: list[torch.Tensor], grad_out) -> Callable[[], None]:
    """A step running ``forward()`` and its backward with the output gradient ``grad_out``."""
    def step():
        for t in leaves:
            t.grad = None
        forward().backward(grad_out)
    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn: Callable[[], object], device: torch.device, warmup: int = 5, reps: int = 30) -> dict:
    """Median and spread (ms) of ``fn``: CUDA events per call on GPU, a synchronized clock on CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    half = len(times) // 2
    med = statistics.median(times)
    return {"ms": med, "min_ms": min(times),
            "spread": abs(statistics.median(times[:half] or times) - statistics.median(times[half:])) / med}


def try_compile(fn: Callable, name: str, log: list) -> Callable | None:
    """``torch.compile(fn)`` or None (the reason goes into ``log``)."""
    try:
        return torch.compile(fn)
    except Exception as e:  # noqa: BLE001
        log.append(f"{name}: torch.compile unavailable ({type(e).__name__}: {e})")
        return None


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if torch.isnan(a).any() or torch.isnan(b).any():
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def write_results(name: str, payload: dict, out: str | None = None) -> Path:
    """Write ``payload`` plus torch version, device and date as ``<results_dir(out)>/<name>.json``."""
    out = results_dir(out)
    payload = dict(payload)
    payload["torch"] = torch.__version__
    payload["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    payload["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    path = out / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, default=str))
    return path


def table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    w = {c: max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(w[c]) for c in cols)]
    lines += ["  ".join(fmt(r.get(c, "")).ljust(w[c]) for c in cols) for r in rows]
    return "\n".join(lines)
