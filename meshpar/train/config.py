"""Training configuration: load a Python file, a TOML file or a dict; validate it; derive the mesh.

A config describes the whole parallel layout in one place::

    parallel = dict(data=2, pipeline=1, tensor=dict(size=4, mode="2d"), sequence=dict(size=1, mode="ring"))
    zero = dict(stage=1)
    precision = "bf16"
    gradient_accumulation = 2
    clip_grad_norm = 1.0

Every mistake is reported as a :class:`ConfigError` naming the key and the fix, before any
process group or collective is touched. See ``docs/config.md`` for every key.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import runpy
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

log = logging.getLogger("meshpar.train.config")

TENSOR_MODES = ("1d", "2d", "2.5d", "3d")
SEQUENCE_MODES = ("ring", "all_to_all")
PRECISIONS = ("fp32", "bf16", "fp16")
#: mesh axis names of each tensor-parallel mode (major to minor)
TENSOR_AXES: dict[str, tuple[str, ...]] = {"1d": ("tp",), "2d": ("x", "y"), "2.5d": ("d", "x", "y"), "3d": ("i", "j", "k")}
#: tensor axes the activation batch dimension is split over, per mode (see design.md's table)
BATCH_TENSOR_AXES: dict[str, tuple[str, ...]] = {"1d": (), "2d": ("x",), "2.5d": ("d", "x"), "3d": ("i", "j")}
KNOWN_KEYS = {"parallel", "zero", "precision", "gradient_accumulation", "clip_grad_norm", "seed",
              "model", "train", "data", "optimizer", "lr_scheduler", "checkpoint", "log", "pipeline_schedule",
              "activation_checkpoint"}
ACTIVATION_CHECKPOINT = ("none", "block", "selective")  # meshpar.memory.checkpoint_activations policies


class ConfigError(ValueError):
    """The config is inconsistent; the message names the key and the fix."""


@dataclass(frozen=True)
class Parallel:
    """The validated parallel layout."""

    data: int
    pipeline: int
    tensor_size: int
    tensor_mode: str | None
    tensor_depth: int
    sequence_size: int
    sequence_mode: str

    @property
    def mesh_shape(self) -> tuple[int, ...]:
        return tuple(size for _, size in self.axes())

    @property
    def mesh_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.axes())

    def axes(self) -> list[tuple[str, int]]:
        """``[(axis name, size), ...]``: "pipe" (when pipeline > 1), "data" (always), the tensor axes
        of the mode (when a mode is set), "sp" (when sequence > 1).

        Size-1 pipe/sp axes are left out so that a model plan sees exactly its mode's axes."""
        out = [("pipe", self.pipeline)] if self.pipeline > 1 else []
        out.append(("data", self.data))
        if self.tensor_mode is not None:
            out += list(zip(TENSOR_AXES[self.tensor_mode], tensor_axis_sizes(self.tensor_mode, self.tensor_size,
                                                                             self.tensor_depth)))
        if self.sequence_size > 1:
            out.append(("sp", self.sequence_size))
        return out

    @property
    def mode(self) -> str:
        """The model plan's mode: "dense" without tensor parallelism, else the tensor mode."""
        return self.tensor_mode or "dense"

    @property
    def world_size(self) -> int:
        return math.prod(self.mesh_shape)

    @property
    def batch_axes(self) -> tuple[str, ...]:
        """Mesh axes the global batch dimension is split over (data first, then tensor axes)."""
        t = BATCH_TENSOR_AXES[self.tensor_mode] if self.tensor_mode else ()
        return ("data",) + t

    def batch_split(self) -> int:
        sizes = dict(self.axes())
        return math.prod(sizes[a] for a in self.batch_axes)


@dataclass
class Config:
    """A validated config. ``raw`` keeps every key as given (plus defaults); ``parallel`` is derived."""

    raw: dict[str, Any]
    parallel: Parallel
    source: str = "<dict>"
    notes: list[str] = field(default_factory=list)

    def __getitem__(self, key: str) -> Any:
        return self.raw[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.raw.get(key, default)

    def section(self, key: str) -> dict[str, Any]:
        """A sub-dict (``model``, ``train``, ``data``...), empty when absent."""
        v = self.raw.get(key) or {}
        if not isinstance(v, Mapping):
            raise ConfigError(f"config key {key!r} must be a dict, got {type(v).__name__}")
        return dict(v)

    @property
    def precision(self) -> str:
        return self.raw["precision"]

    @property
    def zero_stage(self) -> int:
        return int(self.raw["zero"]["stage"])

    @property
    def gradient_accumulation(self) -> int:
        return int(self.raw["gradient_accumulation"])

    @property
    def clip_grad_norm(self) -> float | None:
        v = self.raw.get("clip_grad_norm")
        return None if v is None else float(v)

    @property
    def seed(self) -> int:
        return int(self.raw["seed"])


def tensor_axis_sizes(mode: str, size: int, depth: int = 1) -> tuple[int, ...]:
    """Sizes of the tensor axes of ``mode`` for ``size`` ranks, or raise :class:`ConfigError`."""
    if mode == "1d":
        return (size,)
    if mode == "2d":
        q = math.isqrt(size)
        if q * q != size:
            lo, hi = q * q, (q + 1) ** 2
            raise ConfigError(
                f"parallel.tensor: 2D mode needs a perfect-square size (q x q grid), got size={size}; "
                f"use size={lo if lo > 1 else hi} or {hi}, or mode='1d'")
        return (q, q)
    if mode == "2.5d":
        if depth < 1 or size % depth:
            raise ConfigError(f"parallel.tensor: 2.5D size must be depth x q^2, but size={size} is not divisible by "
                              f"depth={depth}; pick a depth that divides the size")
        qq = size // depth
        q = math.isqrt(qq)
        if q * q != qq:
            raise ConfigError(
                f"parallel.tensor: 2.5D size must be depth x q^2, got size={size}, depth={depth} "
                f"(size/depth={qq} is not a perfect square); e.g. size={depth * (q + 1) ** 2} with depth={depth}")
        return (depth, q, q)
    if mode == "3d":
        q = round(size ** (1 / 3))
        for c in (q - 1, q, q + 1):
            if c > 0 and c ** 3 == size:
                return (c, c, c)
        raise ConfigError(f"parallel.tensor: 3D mode needs a cube size (q x q x q), got size={size}; "
                          f"use size={max(q, 1) ** 3} or {(max(q, 1) + 1) ** 3}")
    raise ConfigError(f"parallel.tensor.mode must be one of {TENSOR_MODES}, got {mode!r}")


def load_config(source: str | os.PathLike | Mapping[str, Any] | ModuleType | Config,
                world_size: int | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Load and validate a config.

    Args:
        source: a ``.py`` file (its top-level names without a leading ``_`` are the keys), a
            ``.toml`` file, a dict, a module, or an existing :class:`Config` (re-validated).
        world_size: when given, the axis product must equal it, and ``parallel.data`` is inferred
            from it when omitted.
        overrides: dotted keys to override, e.g. ``{"train.steps": 10}``.
    """
    if isinstance(source, Config):
        raw, name = copy.deepcopy(source.raw), source.source
    elif isinstance(source, Mapping):
        raw, name = copy.deepcopy(dict(source)), "<dict>"
    elif isinstance(source, ModuleType):
        raw, name = _public(vars(source)), source.__name__
    else:
        path = Path(source)
        if not path.exists():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        if path.suffix == ".toml":
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        elif path.suffix == ".py":
            raw = _public(runpy.run_path(str(path)))
        else:
            raise ConfigError(f"config file {str(path)!r}: use a .py or .toml file")
        name = str(path)
    for k, v in (overrides or {}).items():
        _set_dotted(raw, k, v)
    return validate(raw, world_size=world_size, source=name)


def _public(ns: Mapping[str, Any]) -> dict[str, Any]:
    return {k: copy.deepcopy(v) for k, v in ns.items()
            if not k.startswith("_") and not isinstance(v, ModuleType) and not callable(v)}


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    d = raw
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override {key!r}: {p!r} is not a dict in the config")
    d[parts[-1]] = value


def _int(v: Any, key: str, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"config key {key!r} must be an integer >= {minimum}, got {v!r}")
    return v


def validate(raw: dict[str, Any], world_size: int | None = None, source: str = "<dict>") -> Config:
    """Check every key, fill defaults, and derive the mesh. Raises :class:`ConfigError`."""
    notes: list[str] = []
    unknown = set(raw) - KNOWN_KEYS
    if unknown:
        raise ConfigError(f"unknown config key(s) {sorted(unknown)} in {source}; known keys: {sorted(KNOWN_KEYS)}")
    par = raw.setdefault("parallel", {})
    if not isinstance(par, Mapping):
        raise ConfigError(f"'parallel' must be a dict, got {type(par).__name__}")
    par = dict(par)
    bad = set(par) - {"data", "pipeline", "tensor", "sequence"}
    if bad:
        raise ConfigError(f"unknown key(s) {sorted(bad)} in 'parallel'; use data, pipeline, tensor, sequence")
    pipeline = _int(par.get("pipeline", 1), "parallel.pipeline")
    tensor = par.get("tensor", None)
    if tensor is None:
        tensor = {"size": 1, "mode": None}
    elif isinstance(tensor, int):
        tensor = {"size": tensor, "mode": "1d"}
    tensor = dict(tensor)
    t_size = _int(tensor.get("size", 1), "parallel.tensor.size")
    t_mode = tensor.get("mode", "1d")
    if t_mode in ("dense", "none"):
        t_mode = None
    if t_mode is not None:
        t_mode = str(t_mode).lower()
        if t_mode not in TENSOR_MODES:
            raise ConfigError(f"parallel.tensor.mode must be one of {TENSOR_MODES} (or None), got {t_mode!r}")
    if t_mode is None and t_size != 1:
        raise ConfigError(f"parallel.tensor.size={t_size} needs a mode: one of {TENSOR_MODES}")
    depth = _int(tensor.get("depth", 1), "parallel.tensor.depth")
    if t_mode == "2.5d" and "depth" not in tensor:
        raise ConfigError("parallel.tensor: 2.5D mode needs a depth, e.g. tensor=dict(size=8, mode='2.5d', depth=2)")
    if t_mode is not None:
        tensor_axis_sizes(t_mode, t_size, depth)
    seq = par.get("sequence", None)
    if seq is None:
        seq = {"size": 1, "mode": "ring"}
    elif isinstance(seq, int):
        seq = {"size": seq, "mode": "ring"}
    seq = dict(seq)
    s_size = _int(seq.get("size", 1), "parallel.sequence.size")
    s_mode = str(seq.get("mode", "ring")).lower()
    if s_mode not in SEQUENCE_MODES:
        raise ConfigError(f"parallel.sequence.mode must be one of {SEQUENCE_MODES}, got {s_mode!r}")
    others = pipeline * t_size * s_size
    data = par.get("data", None)
    if data is None:
        if world_size is None:
            data = 1
        else:
            if world_size % others:
                raise ConfigError(
                    f"cannot infer parallel.data: world size {world_size} is not divisible by pipeline x tensor x "
                    f"sequence = {pipeline} x {t_size} x {s_size} = {others}")
            data = world_size // others
        notes.append(f"parallel.data not set: inferred data={data} from world size {world_size} "
                     f"/ (pipeline {pipeline} x tensor {t_size} x sequence {s_size})")
    data = _int(data, "parallel.data")
    if world_size is not None and data * others != world_size:
        raise ConfigError(
            f"the parallel axes multiply to data {data} x pipeline {pipeline} x tensor {t_size} x sequence {s_size} "
            f"= {data * others}, but the world has {world_size} processes; launch {data * others} processes "
            f"or change the sizes (omit parallel.data to infer it)")
    parallel = Parallel(data, pipeline, t_size, t_mode, depth, s_size, s_mode)
    raw["parallel"] = dict(data=data, pipeline=pipeline, tensor=dict(size=t_size, mode=t_mode, depth=depth),
                           sequence=dict(size=s_size, mode=s_mode))

    zero = raw.get("zero", None)
    zero = {"stage": 0} if zero is None else ({"stage": zero} if isinstance(zero, int) else dict(zero))
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero.stage must be 0, 1, 2 or 3, got {stage!r}")
    raw["zero"] = zero
    prec = str(raw.get("precision", "fp32")).lower()
    prec = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}.get(prec, prec)
    if prec not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {raw.get('precision')!r}")
    raw["precision"] = prec
    raw["gradient_accumulation"] = _int(raw.get("gradient_accumulation", 1), "gradient_accumulation")
    clip = raw.get("clip_grad_norm", None)
    if clip is not None and (not isinstance(clip, (int, float)) or clip <= 0):
        raise ConfigError(f"clip_grad_norm must be a positive number or None, got {clip!r}")
    raw["clip_grad_norm"] = clip
    raw["seed"] = _int(raw.get("seed", 1234), "seed", minimum=0)
    ac = str(raw.get("activation_checkpoint", "none")).lower()
    if ac not in ACTIVATION_CHECKPOINT:
        raise ConfigError(f"activation_checkpoint must be one of {ACTIVATION_CHECKPOINT}, got {raw.get('activation_checkpoint')!r}")
    raw["activation_checkpoint"] = ac
    for sec in ("model", "train", "data", "optimizer", "lr_scheduler", "checkpoint", "log"):
        v = raw.get(sec)
        if v is not None and not isinstance(v, Mapping):
            raise ConfigError(f"config key {sec!r} must be a dict, got {type(v).__name__}")
    _check_batch(raw, parallel)
    cfg = Config(raw=raw, parallel=parallel, source=source, notes=notes)
    for n in notes:
        log.info(n)
    return cfg


def _check_batch(raw: dict[str, Any], parallel: Parallel) -> None:
    """The global batch must cover (and divide over) every rank the batch dimension is split over."""
    train = raw.get("train") or {}
    model = raw.get("model") or {}
    bs = train.get("batch_size")
    if bs is not None:
        bs = _int(bs, "train.batch_size")
        split = parallel.batch_split()
        desc = " x ".join(f"{a}={dict(parallel.axes())[a]}" for a in parallel.batch_axes)
        if bs < split:
            raise ConfigError(
                f"train.batch_size={bs} is smaller than the {split} ranks the batch dimension is split over "
                f"({desc}); use batch_size >= {split} (a multiple of {split})")
        if bs % split:
            raise ConfigError(f"train.batch_size={bs} is not divisible by the {split} ranks the batch dimension is "
                              f"split over ({desc}); use a multiple of {split}")
        if parallel.pipeline > 1:
            m = (raw.get("pipeline_schedule") or {}).get("num_microbatches", parallel.pipeline)
            m = _int(m, "pipeline_schedule.num_microbatches")
            if bs % (split * m):
                raise ConfigError(
                    f"train.batch_size={bs} does not split into {m} pipeline micro-batches over the {split} ranks "
                    f"the batch dimension is split over ({desc}): use a multiple of {split} x {m} = {split * m}, "
                    f"or change pipeline_schedule.num_microbatches")
    seq = model.get("block_size", train.get("seq_len"))
    if seq is not None and parallel.sequence_size > 1 and seq % parallel.sequence_size:
        raise ConfigError(f"sequence length {seq} is not divisible by parallel.sequence.size="
                          f"{parallel.sequence_size}; use a multiple of {parallel.sequence_size}")
    if parallel.tensor_mode is not None and parallel.tensor_size > 1:
        sizes = tensor_axis_sizes(parallel.tensor_mode, parallel.tensor_size, parallel.tensor_depth)
        q = sizes[-1]
        for key in ("n_embd", "d_model", "hidden"):
            h = model.get(key)
            need = {"1d": parallel.tensor_size, "3d": q * q}.get(parallel.tensor_mode, q)
            if h is not None and h % need:
                raise ConfigError(f"model.{key}={h} is not divisible by {need} (tensor mode "
                                  f"{parallel.tensor_mode}, size {parallel.tensor_size}); use a multiple of {need}")
