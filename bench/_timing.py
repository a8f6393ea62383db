"""Shared helpers of the kernel benchmarks: device timing (events, median), results output."""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch


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


def write_results(name: str, payload: dict) -> Path:
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).resolve().parent / "results"
    out.mkdir(parents=True, exist_ok=True)
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
