"""The ``meshpar`` command.

``meshpar run --nproc-per-node N train.py --config cfg.py`` wraps ``torch.distributed.run``
(``--standalone`` unless rendezvous options are given; gloo on CPU is chosen by ``launch``).
``meshpar check`` reports torch, CUDA, NCCL, the GPUs and each ``cuda_ops`` kernel (built / fallback /
failed, with the reason); ``meshpar build-ops`` prebuilds the kernels (see docs/kernels.md).
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
    out.update(_cuda_ops_status())
    for mod in ("tqdm", "matplotlib", "safetensors", "tensorboard"):
        try:
            importlib.import_module(mod)
            out[mod] = "installed"
        except ImportError:
            out[mod] = "not installed"
    return out


def _cuda_ops_status() -> dict[str, str]:
    """``{"kernel NAME": "built|fallback|failed (reason)"}`` for every ``cuda_ops`` kernel (builds them)."""
    try:
        import cuda_ops
    except ImportError as e:
        return {"cuda ops": f"cuda_ops not importable ({e}); pure-torch fallbacks are used"}
    res = cuda_ops.build_all()
    counts = {k: sum(s.state == k for s in res.values()) for k in ("built", "fallback", "failed")}
    out = {"cuda ops": ", ".join(f"{v} {k}" for k, v in counts.items())}
    out.update({f"kernel {n}": f"{s.state} ({s.reason})" for n, s in res.items()})
    return out


def build_ops() -> int:
    """``meshpar build-ops``: build every kernel that applies here; exit code 1 if one failed to build."""
    import cuda_ops

    res = cuda_ops.build_all()
    for n, s in res.items():
        print(f"{n:>12}: {s.state:<8} {s.reason}")
    return 1 if any(s.state == "failed" for s in res.values()) else 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="meshpar", description="meshpar launcher and environment check")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("run", help="torchrun wrapper: meshpar run --nproc-per-node N script.py [script args]",
                   add_help=False)
    sub.add_parser("check", help="report torch, CUDA, NCCL, GPUs and each cuda_ops kernel (built/fallback/failed)")
    sub.add_parser("build-ops", help="prebuild the cuda_ops kernels (C++/CUDA, JIT with ninja) into the cache")
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
    if args.cmd == "build-ops":
        return build_ops()
    return 0


if __name__ == "__main__":
    sys.exit(main())
