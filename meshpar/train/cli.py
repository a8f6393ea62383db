"""The ``meshpar`` command.

``meshpar run --nproc-per-node N train.py --config cfg.py`` wraps ``torch.distributed.run``
(``--standalone`` unless rendezvous options are given; gloo on CPU is chosen by ``launch``).
``meshpar check`` reports torch, CUDA, NCCL, the GPUs and whether the CUDA ops build.
"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
from typing import Sequence


def _run(argv: Sequence[str]) -> int:
    from torch.distributed import run as torchrun

    argv = list(argv)
    if not any(a.startswith(("--rdzv", "--master", "--standalone", "--nnodes")) for a in argv):
        argv.insert(0, "--standalone")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torchrun.main(argv)
    return 0


def check() -> dict[str, str]:
    """Environment report as ``{item: value}`` (also printed by ``meshpar check``)."""
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda available": str(torch.cuda.is_available()), "cuda (build)": str(torch.version.cuda)}
    try:
        import torch.distributed as dist
        out["gloo"] = str(dist.is_gloo_available())
        out["nccl"] = str(dist.is_nccl_available())
        if torch.cuda.is_available() and dist.is_nccl_available():
            out["nccl version"] = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception as e:  # noqa: BLE001 - a report, not a failure
        out["distributed"] = f"error: {e}"
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    out["gpus"] = str(n)
    for i in range(n):
        p = torch.cuda.get_device_properties(i)
        out[f"gpu {i}"] = f"{p.name}, {p.total_memory / 2 ** 30:.0f} GiB, sm_{p.major}{p.minor}"
    out["cuda ops"] = _cuda_ops_status()
    for mod in ("tqdm", "matplotlib", "safetensors", "tensorboard"):
        try:
            importlib.import_module(mod)
            out[mod] = "installed"
        except ImportError:
            out[mod] = "not installed"
    return out


def _cuda_ops_status() -> str:
    import torch

    if not torch.cuda.is_available():
        return "skipped (no CUDA device; pure-torch fallbacks are used)"
    try:
        ops = importlib.import_module("cuda_ops")
    except ImportError:
        return "no cuda_ops package found (pure-torch fallbacks are used)"
    build = getattr(ops, "build_all", None) or getattr(ops, "load", None)
    if build is None:
        return "cuda_ops present; no build entry point (build_all/load)"
    try:
        build()
        return "build OK"
    except Exception as e:  # noqa: BLE001
        return f"build FAILED: {type(e).__name__}: {e}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="meshpar", description="meshpar launcher and environment check")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("run", help="torchrun wrapper: meshpar run --nproc-per-node N script.py [script args]",
                   add_help=False)
    sub.add_parser("check", help="report torch, CUDA, NCCL, GPUs and whether the CUDA ops build")
    if argv and argv[0] == "run":
        if len(argv) == 1 or argv[1] in ("-h", "--help"):
            print("usage: meshpar run [torchrun options] script.py [script args]\n"
                  "  e.g. meshpar run --nproc-per-node 4 examples/gpt/train.py --config examples/gpt/configs/2d.py\n"
                  "  all torchrun options are accepted (--nnodes, --max-restarts, --rdzv-endpoint, ...)")
            return 0
        return _run(argv[1:])
    args = parser.parse_args(argv)
    if args.cmd == "check":
        for k, v in check().items():
            print(f"{k:>16}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
