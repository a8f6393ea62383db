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
import difflib
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


#: The keys of every section meshpar reads, nested. ``None`` marks a free-form section (the
#: script's own: ``model``, ``data``, ``optimizer``, ``lr_scheduler``), only checked to be a dict.
SCHEMA: dict[str, Any] = {
    "parallel": {"data": {}, "pipeline": {}, "tensor": {"size": {}, "mode": {}, "depth": {}},
                 "sequence": {"size": {}, "mode": {}}},
    "zero": {"stage": {}, "options": {"bucket_mb": {}, "master_dtype": {}, "loss_scale": {}, "grad_reduce": {},
                                      "prefetch": {}}},
    "precision": {}, "gradient_accumulation": {}, "clip_grad_norm": {}, "seed": {}, "activation_checkpoint": {},
    "pipeline_schedule": {"schedule": {}, "num_microbatches": {}, "chunks": {}, "partition": {}},
    "train": {"batch_size": {}, "steps": {}, "epochs": {}, "warmup": {}, "eval_every": {}, "eval_batches": {},
              "sample_tokens": {}, "progress": {}, "seq_len": {}},
    "checkpoint": {"dir": {}, "every": {}, "resume": {}, "keep": {}, "export": {}},
    "log": {"every": {}, "jsonl": {}, "tensorboard": {}},
    "model": None, "data": None, "optimizer": None, "lr_scheduler": None,
}
KNOWN_KEYS = set(SCHEMA)
PIPELINE_SCHEDULES = ("1f1b", "gpipe", "interleaved")


def _check_keys(d: Mapping[str, Any], schema: Mapping[str, Any], where: str) -> None:
    """Every key of ``d`` (recursively, where the value is a dict with a schema) is known."""
    for k, v in d.items():
        if k not in schema:
            close = difflib.get_close_matches(str(k), [str(x) for x in schema], n=1, cutoff=0.5)
            msg = f"unknown config key {where + str(k)!r}"
            if close:
                msg += f" (did you mean {where + close[0]!r}?)"
            raise ConfigError(f"{msg}; known keys{' of ' + where[:-1] if where else ''}: {sorted(schema)}")
        sub = schema[k]
        if sub and isinstance(v, Mapping):
            _check_keys(v, sub, f"{where}{k}.")


def _section_dict(v: Any, key: str) -> dict[str, Any]:
    if not isinstance(v, Mapping):
        raise ConfigError(f"config key {key!r} must be a dict, got {type(v).__name__} ({v!r})")
    return dict(v)


def validate(raw: dict[str, Any], world_size: int | None = None, source: str = "<dict>") -> Config:
    """Check every key (nested), fill defaults, and derive the mesh. Raises :class:`ConfigError`.

    Runs before any process group exists: every unknown key (with the closest known one),
    wrong type, and unsupported combination is reported here, with the fix.
    """
    notes: list[str] = []
    _check_keys(raw, SCHEMA, "")
    par = raw.setdefault("parallel", {})
    if par is None:
        par = {}
    par = _section_dict(par, "parallel")
    pipeline = _int(par.get("pipeline", 1), "parallel.pipeline")
    t_size, t_mode, depth = _tensor(par.get("tensor", None))
    seq = par.get("sequence", None)
    if seq is None:
        seq = {"size": 1, "mode": "ring"}
    elif isinstance(seq, int) and not isinstance(seq, bool):
        seq = {"size": seq, "mode": "ring"}
    seq = _section_dict(seq, "parallel.sequence")
    s_size = _int(seq.get("size", 1), "parallel.sequence.size")
    if "mode" in seq and "size" not in seq:
        raise ConfigError(f"parallel.sequence.mode={seq['mode']!r} is set without parallel.sequence.size; "
                          "add size=N (the ranks the sequence is split over), e.g. sequence=dict(size=2, mode='ring')")
    s_mode = str(seq.get("mode", "ring")).lower()
    if s_mode not in SEQUENCE_MODES:
        raise ConfigError(f"parallel.sequence.mode must be one of {SEQUENCE_MODES}, got {seq.get('mode')!r}")
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
    if zero is None:
        zero = {"stage": 0}
    elif isinstance(zero, int) and not isinstance(zero, bool):
        zero = {"stage": zero}
    zero = _section_dict(zero, "zero")
    stage = zero.setdefault("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero.stage must be 0, 1, 2 or 3, got {stage!r}")
    if "options" in zero:
        _section_dict(zero["options"], "zero.options")
    raw["zero"] = zero
    prec = raw.get("precision", "fp32")
    if not isinstance(prec, str):
        raise ConfigError(f"precision must be one of {PRECISIONS} (a string), got {prec!r}")
    prec = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}.get(prec.lower(), prec.lower())
    if prec not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {raw.get('precision')!r}")
    raw["precision"] = prec
    raw["gradient_accumulation"] = _int(raw.get("gradient_accumulation", 1), "gradient_accumulation")
    clip = raw.get("clip_grad_norm", None)
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip <= 0):
        raise ConfigError(f"clip_grad_norm must be a positive number or None, got {clip!r}")
    raw["clip_grad_norm"] = clip
    raw["seed"] = _int(raw.get("seed", 1234), "seed", minimum=0)
    ac = str(raw.get("activation_checkpoint", "none")).lower()
    if ac not in ACTIVATION_CHECKPOINT:
        raise ConfigError(f"activation_checkpoint must be one of {ACTIVATION_CHECKPOINT}, "
                          f"got {raw.get('activation_checkpoint')!r}")
    raw["activation_checkpoint"] = ac
    for sec in ("model", "train", "data", "optimizer", "lr_scheduler", "checkpoint", "log", "pipeline_schedule"):
        v = raw.get(sec)
        if v is not None:
            _section_dict(v, sec)
    _check_pipeline(raw, parallel)
    _check_sections(raw)
    _check_batch(raw, parallel)
    cfg = Config(raw=raw, parallel=parallel, source=source, notes=notes)
    for n in notes:
        log.info(n)
    return cfg


def _tensor(tensor: Any) -> tuple[int, str | None, int]:
    """``(size, mode, depth)`` of ``parallel.tensor`` (None, an int = 1D, or a dict)."""
    if tensor is None:
        return 1, None, 1
    if isinstance(tensor, int) and not isinstance(tensor, bool):
        _int(tensor, "parallel.tensor")
        return tensor, ("1d" if tensor > 1 else None), 1
    tensor = _section_dict(tensor, "parallel.tensor")
    if "size" not in tensor and tensor.get("mode") not in (None, "dense", "none"):
        raise ConfigError(f"parallel.tensor.mode={tensor['mode']!r} is set without parallel.tensor.size, so there "
                          f"would be no tensor parallelism; add size=N, e.g. tensor=dict(size=4, mode="
                          f"{str(tensor['mode'])!r})")
    t_size = _int(tensor.get("size", 1), "parallel.tensor.size")
    t_mode = tensor.get("mode", "1d" if t_size > 1 else None)
    if t_mode in ("dense", "none"):
        t_mode = None
    if t_mode is not None:
        if not isinstance(t_mode, str) or t_mode.lower() not in TENSOR_MODES:
            raise ConfigError(f"parallel.tensor.mode must be one of {TENSOR_MODES} (or None), got {t_mode!r}")
        t_mode = t_mode.lower()
    if t_mode is None and t_size != 1:
        raise ConfigError(f"parallel.tensor.size={t_size} needs a mode: one of {TENSOR_MODES}")
    if t_mode is not None and t_size == 1:
        # deliberate: the mode's plan on size-1 axes (a one-rank layout: develop or measure a plan on one GPU)
        log.info(f"parallel.tensor.size=1 with mode={t_mode!r}: the {t_mode} plan on size-1 axes, no tensor "
                 f"parallelism (a one-rank layout)")
    if tensor.get("depth", 1) != 1 and t_mode != "2.5d":
        raise ConfigError(f"parallel.tensor.depth is only for mode '2.5d' (got mode {t_mode!r}); remove depth or "
                          f"use mode='2.5d'")
    depth = _int(tensor.get("depth", 1), "parallel.tensor.depth")
    if t_mode == "2.5d" and "depth" not in tensor:
        raise ConfigError("parallel.tensor: 2.5D mode needs a depth, e.g. tensor=dict(size=8, mode='2.5d', depth=2)")
    if t_mode is not None:
        tensor_axis_sizes(t_mode, t_size, depth)
    return t_size, t_mode, depth


def _check_pipeline(raw: dict[str, Any], parallel: Parallel) -> None:
    """``pipeline_schedule`` values, and what does not combine with ``parallel.pipeline > 1``."""
    opts = dict(raw.get("pipeline_schedule") or {})
    sched = opts.get("schedule", "1f1b")
    if sched not in PIPELINE_SCHEDULES:
        close = difflib.get_close_matches(str(sched), PIPELINE_SCHEDULES, n=1, cutoff=0.5)
        raise ConfigError(f"pipeline_schedule.schedule must be one of {PIPELINE_SCHEDULES}, got {sched!r}"
                          + (f"; did you mean {close[0]!r}?" if close else ""))
    chunks = _int(opts.get("chunks", 1), "pipeline_schedule.chunks")
    m = _int(opts.get("num_microbatches", max(parallel.pipeline, 1)), "pipeline_schedule.num_microbatches")
    part = opts.get("partition", "uniform")
    if not (part in ("uniform", "parameters") or (isinstance(part, (list, tuple))
                                                   and all(isinstance(i, int) and not isinstance(i, bool)
                                                           for i in part))):
        raise ConfigError(f"pipeline_schedule.partition must be 'uniform', 'parameters' or a list of cut indices, "
                          f"got {part!r}")
    if sched == "1f1b" and chunks != 1:
        raise ConfigError(f"pipeline_schedule.chunks={chunks} with schedule '1f1b' (one chunk per rank); use "
                          f"schedule='interleaved' for several chunks per rank, or chunks=1")
    if sched == "interleaved":
        if chunks < 2:
            raise ConfigError("pipeline_schedule: schedule 'interleaved' needs chunks >= 2 virtual stages per rank "
                              f"(got chunks={chunks}); set chunks=2, or use schedule='1f1b' with one chunk")
        if m % max(parallel.pipeline, 1):
            raise ConfigError(f"pipeline_schedule.num_microbatches={m} must be a multiple of parallel.pipeline="
                              f"{parallel.pipeline} for schedule 'interleaved'")
    if parallel.pipeline > 1:
        if raw["zero"]["stage"] == 3:
            raise ConfigError("zero.stage=3 does not combine with parallel.pipeline > 1 (stage 3 gathers parameters "
                              "with module hooks); use zero.stage 0, 1 or 2, or no pipeline")
        if raw["gradient_accumulation"] != 1:
            raise ConfigError(f"gradient_accumulation={raw['gradient_accumulation']} does not combine with "
                              f"parallel.pipeline > 1; set gradient_accumulation=1 and use "
                              f"pipeline_schedule.num_microbatches instead (micro-batches are the pipeline's "
                              f"accumulation)")


def _check_sections(raw: dict[str, Any]) -> None:
    """Types of the keys meshpar reads in ``train``, ``checkpoint`` and ``log``."""
    train, ck, lg = (dict(raw.get(k) or {}) for k in ("train", "checkpoint", "log"))
    for k in ("steps", "epochs", "eval_batches", "seq_len"):
        if train.get(k) is not None:
            _int(train[k], f"train.{k}")
    for k in ("warmup", "eval_every", "sample_tokens"):
        if train.get(k) is not None:
            _int(train[k], f"train.{k}", minimum=0)
    if ck.get("every") is not None:
        _int(ck["every"], "checkpoint.every", minimum=0)
    if ck.get("keep") is not None:
        _int(ck["keep"], "checkpoint.keep")
    for k in ("resume",):
        if k in ck and not isinstance(ck[k], bool):
            raise ConfigError(f"checkpoint.{k} must be True or False, got {ck[k]!r}")
    if lg.get("every") is not None:
        _int(lg["every"], "log.every")


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
