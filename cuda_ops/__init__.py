"""JIT-built C++/CUDA kernels, each with a pure-torch fallback that gives the same results.

Every kernel is a small C/C++ or CUDA source under ``cuda_ops/csrc`` exporting plain ``extern "C"``
functions (raw pointers, sizes, a CUDA stream), built on first use with
``torch.utils.cpp_extension.load`` (ninja) as a shared library and called through ``ctypes``. No
torch or pybind headers are compiled, so a build takes seconds (the CPU AdamW: about 3-6 s with g++ on
one core), and the wrappers in Python check dtypes, devices and contiguity before every call.

Build cache: ``$MESHPAR_OPS_CACHE`` or ``~/.cache/meshpar/cuda_ops``, one directory per
``torch version / CUDA version / host CPU (for -march=native) / hash of the source and flags``, so a
changed source, torch or machine rebuilds and nothing stale is loaded.

Fallback rule: no compiler, no CUDA (for a CUDA kernel), a failed build, a failed load, or
``MESHPAR_DISABLE_KERNELS`` (``1``/``all`` or a comma list of kernel names), or a CUDA kernel whose
GPU check has not passed yet (``verified=False``) and that ``MESHPAR_ENABLE_KERNELS`` does not list -> :func:`load` returns
``None`` and the caller uses its pure-torch path. The reason is logged once per kernel (``logging``,
logger ``cuda_ops``); nothing raises.

``meshpar build-ops`` prebuilds every kernel; ``meshpar check`` lists each as built / fallback / failed.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import logging
import os
import platform
import shutil
from pathlib import Path

import torch

log = logging.getLogger("cuda_ops")

_CSRC = Path(__file__).resolve().parent / "csrc"
# Hopper machine code (sm_90a) plus compute_80 PTX that the driver compiles for any other GPU >= sm_80
_CUDA_ARCH = ("-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_80,code=compute_80")


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One kernel library: its sources, whether it needs CUDA, its flags and its C signatures.

    ``functions`` maps each exported C function to ``(restype, [argtypes])`` (ctypes types).
    """

    name: str
    sources: tuple[str, ...]
    cuda: bool
    cflags: tuple[str, ...] = ()
    cuda_cflags: tuple[str, ...] = ()
    ldflags: tuple[str, ...] = ()
    functions: dict = dataclasses.field(default_factory=dict)
    doc: str = ""
    #: a CUDA kernel is used by default only once its GPU check and benchmark have passed on a real
    #: GPU (recorded in docs/kernels.md); until then it is opt-in (``MESHPAR_ENABLE_KERNELS``)
    verified: bool = True


_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_F = ctypes.c_float
_D = ctypes.c_double
_INT = ctypes.c_int
_U32 = ctypes.c_uint32

KERNELS: dict[str, KernelSpec] = {
    "cpu_adamw": KernelSpec(
        "cpu_adamw", ("cpu_adamw.cpp",), cuda=False,
        cflags=("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"), ldflags=("-fopenmp",),
        functions={"meshpar_adamw_f32": (_INT, [_P, _P, _P, _P, _P, _I64, _INT, _F, _F, _F, _F, _F, _F, _F, _INT]),
                   "meshpar_omp_max_threads": (_INT, [])},
        doc="AdamW step on flat fp32 CPU tensors (OpenMP, vectorized), optional bf16 copy-out"),
    "dropout": KernelSpec(
        "dropout", ("dropout.cu",), cuda=True, verified=False, cuda_cflags=("-O3", *_CUDA_ARCH),
        functions={"meshpar_hash_dropout": (_INT, [_P, _P, _P, _P, _INT, _I64, _P, _P, _P, _INT, _U32, _U32, _D,
                                                   _P])},
        doc="layout-independent hash dropout, optionally fused bias + dropout + residual (mask never stored)"),
    "ring_merge": KernelSpec(
        "ring_merge", ("ring_merge.cu",), cuda=True, verified=False, cuda_cflags=("-O3", *_CUDA_ARCH),
        functions={"meshpar_ring_merge": (_INT, [_P, _P, _P, _P, _INT, _INT, _P, _P, _P, _P, _P]),
                   "meshpar_ring_grad_acc": (_INT, [_P, _P, _P, _P, _P, _P, _INT, _INT, _P, _P, _P])},
        doc="ring attention: log-sum-exp merge; dQ and GQA-reduced dK/dV fp32 accumulation"),
    "bias_act": KernelSpec(
        "bias_act", ("bias_act.cu",), cuda=True, verified=False, cuda_cflags=("-O3", *_CUDA_ARCH),
        functions={"meshpar_bias_gelu_fwd": (_INT, [_P, _P, _P, _INT, _I64, _I64, _INT, _P]),
                   "meshpar_bias_gelu_bwd": (_INT, [_P, _P, _P, _P, _INT, _I64, _I64, _INT, _P])},
        doc="bias + GeLU, forward and backward"),
}


def _listed(var: str, name: str) -> bool:
    v = os.environ.get(var, "").strip().lower()
    if v in ("", "0", "false", "no"):
        return False
    return v in ("1", "all", "true", "yes") or name in {s.strip() for s in v.split(",")}


def _disabled(name: str) -> bool:
    """Forced off (``MESHPAR_DISABLE_KERNELS``), or not yet verified on a GPU and not opted in
    (``MESHPAR_ENABLE_KERNELS``, ``1``/``all`` or a comma list)."""
    if _listed("MESHPAR_DISABLE_KERNELS", name):
        return True
    return not KERNELS[name].verified and not _listed("MESHPAR_ENABLE_KERNELS", name)


def _cpu_tag() -> str:
    """The host CPU's identity (model and flags): -march=native code must not run on another CPU."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = [platform.processor()]
    return hashlib.sha1("\n".join(lines + [platform.machine()]).encode()).hexdigest()[:8]


def _spec_hash(spec: KernelSpec) -> str:
    h = hashlib.sha1()
    for s in spec.sources:
        h.update((_CSRC / s).read_bytes())
    if spec.cuda:  # the shared headers too
        for hdr in sorted(_CSRC.glob("*.cuh")):
            h.update(hdr.read_bytes())
    h.update(repr((spec.cflags, spec.cuda_cflags, spec.ldflags)).encode())
    return h.hexdigest()[:12]


def build_dir(spec: KernelSpec) -> Path:
    """Where ``spec`` is built: keyed by torch, CUDA, host CPU and the hash of sources and flags."""
    root = Path(os.environ.get("MESHPAR_OPS_CACHE", Path.home() / ".cache" / "meshpar" / "cuda_ops"))
    cuda = torch.version.cuda or "cpu"
    key = f"torch{torch.__version__}-cuda{cuda}-{_cpu_tag()}".replace("+", "_")
    return root / key / f"{spec.name}-{_spec_hash(spec)}"


def _unavailable_reason(spec: KernelSpec) -> str | None:
    if _disabled(spec.name):
        return _disabled_reason(spec.name)
    if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
        return "no C++ compiler on PATH"
    try:
        from torch.utils.cpp_extension import verify_ninja_availability
        verify_ninja_availability()
    except Exception:  # noqa: BLE001 - any reason means "no ninja"
        return "ninja not found (pip install ninja)"
    if spec.cuda:
        from torch.utils.cpp_extension import CUDA_HOME
        if not torch.cuda.is_available():
            return "no CUDA device"
        if torch.version.cuda is None:
            return "torch built without CUDA"
        if CUDA_HOME is None or shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")) is None:
            return "nvcc not found (set CUDA_HOME)"
    return None


@dataclasses.dataclass
class Library:
    """A loaded kernel library: ``lib.fn(*args)`` calls the C function (ctypes, signatures set)."""

    name: str
    path: str
    handle: ctypes.CDLL

    def call(self, fn: str, *args) -> None:
        """Call ``fn``; a nonzero return code (a CUDA error or a bad argument) raises RuntimeError."""
        rc = getattr(self.handle, fn)(*args)
        if rc != 0:
            msg = ""
            if KERNELS[self.name].cuda:
                try:
                    msg = ": " + torch.cuda.cudart().cudaGetErrorString(rc)
                except Exception:  # noqa: BLE001
                    pass
            raise RuntimeError(f"cuda_ops.{self.name}.{fn} returned error {rc}{msg}")


def _build(spec: KernelSpec, verbose: bool = False) -> Library:
    from torch.utils.cpp_extension import load

    d = build_dir(spec)
    d.mkdir(parents=True, exist_ok=True)
    lib_name = f"meshpar_{spec.name}"
    load(name=lib_name, sources=[str(_CSRC / s) for s in spec.sources], extra_cflags=list(spec.cflags),
         extra_cuda_cflags=list(spec.cuda_cflags), extra_ldflags=list(spec.ldflags), build_directory=str(d),
         with_cuda=spec.cuda, is_python_module=False, verbose=verbose)
    path = d / f"{lib_name}.so"
    if not path.exists():
        cands = sorted(d.glob(f"{lib_name}*.so"))
        if not cands:
            raise FileNotFoundError(f"no {lib_name}*.so in {d} after the build")
        path = cands[0]
    handle = ctypes.CDLL(str(path))
    for fn, (res, args) in spec.functions.items():
        f = getattr(handle, fn)
        f.restype, f.argtypes = res, args
    return Library(spec.name, str(path), handle)


@dataclasses.dataclass(frozen=True)
class Status:
    """``state`` is ``"built"``, ``"fallback"`` (not applicable here) or ``"failed"`` (build/load error)."""

    state: str
    reason: str
    library: Library | None = None


@functools.lru_cache(maxsize=None)
def _status(name: str) -> Status:
    # Cached per process (a build or a failure is final for this process); the cache is the only state.
    spec = KERNELS[name]
    why = _unavailable_reason(spec)
    if why is not None:
        log.info("cuda_ops: %s not used (%s); using the pure-torch fallback", name, why)
        return Status("fallback", why)
    try:
        lib = _build(spec, verbose=os.environ.get("MESHPAR_OPS_VERBOSE", "") == "1")
    except Exception as e:  # noqa: BLE001 - any build failure means fallback
        first = str(e).strip().splitlines()
        why = f"{type(e).__name__}: {first[-1] if first else ''}"[:300]
        log.warning("cuda_ops: building %s failed (%s); using the pure-torch fallback", name, why)
        return Status("failed", why)
    return Status("built", lib.path, lib)


def load(name: str) -> Library | None:
    """The built library of kernel ``name``, or ``None`` (use the fallback; the reason is logged once)."""
    if _disabled(name):  # checked on every call so tests can force the fallback with the env variable
        return None
    return _status(name).library


def status(name: str) -> Status:
    """Build (if needed) and report kernel ``name``."""
    if _disabled(name):
        return Status("fallback", _disabled_reason(name))
    return _status(name)


def _disabled_reason(name: str) -> str:
    if _listed("MESHPAR_DISABLE_KERNELS", name):
        return "disabled by MESHPAR_DISABLE_KERNELS"
    return f"not yet verified on a GPU: opt in with MESHPAR_ENABLE_KERNELS={name}"


def build_all() -> dict[str, Status]:
    """Build every kernel that applies on this machine (the CUDA ones in parallel); ``{name: Status}``."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(KERNELS)) as ex:
        futs = {n: ex.submit(status, n) for n in KERNELS}
    return {n: f.result() for n, f in futs.items()}


def clear_cache() -> None:
    """Forget this process's build results (the files on disk stay); for tests."""
    _status.cache_clear()


__all__ = ["KERNELS", "KernelSpec", "Library", "Status", "load", "status", "build_all", "build_dir", "clear_cache"]
