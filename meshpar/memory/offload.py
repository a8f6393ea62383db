"""Training a model larger than the device: chunked parameters, grads in place, hybrid AdamW.

::

    off = meshpar.memory.offload(model, units="h.*", memory="auto", lr=3e-4)   # hooks the model
    for x, y in data:
        loss = model(x, y); loss.backward()          # chunks move as the units run
        off.step()                                    # finishes the optimizer step
    print(meshpar.memory.report(off))

What happens (PatrickStar / Colossal-AI Gemini):

* The parameters of the ``units`` (modules whose forward is called), in unit order (the
  first-use order of a sequential model), are packed into fixed-size **parameter chunks** of the
  compute dtype. ``param.data`` is a view into a chunk while it is on the device and a NaN
  placeholder otherwise.
* Forward pre-hooks and backward pre-hooks of each unit bring its chunks to the device
  (``COMPUTE``) and prefetch the next units' chunks; after a unit they are ``HOLD`` (movable).
* A parameter's gradient is written into the parameter's own slot once it is accumulated
  (``HOLD_AFTER_BWD``): the compute-dtype chunk is reused for gradients, ``param.grad`` stays None.
* When all slots of a chunk hold gradients, its optimizer step runs at once, overlapped with the
  rest of the backward: on the device if its optimizer-state chunks (``master``, ``exp_avg``,
  ``exp_avg_sq``, the master dtype) live there, else the gradients are downloaded and a CPU AdamW
  steps on a worker thread. The new parameters are written back into the chunk.
* With a ``data`` axis (ZeRO), each chunk's gradient is reduce-scattered over it, every rank holds
  and steps only its shard of the optimizer-state chunks, and the new parameters are all-gathered.
* Tensor parallelism: a ShardedTensor parameter (``meshpar.parallelize``) is chunked as its *local
  block* (``p._local``), which is the view into the chunk or the placeholder; its gradient's local
  block is reduced as the ZeRO optimizer reduces it (summed over ``data`` when it arrives partial
  there, see :func:`meshpar.optim.params.grad_factor`) before it goes into the slot.
* The first step is a warm-up: it records the access trace and the non-model memory, and defers
  the optimizer steps to :meth:`Offload.step`, where the placement of the optimizer state is
  decided (``memory="auto"``: on the device as far as it fits, the chunks stepped last in the
  backward first).
"""
from __future__ import annotations

import fnmatch
import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn

from ..optim.params import (DEFER_ATTR, describe, grad_factor, grad_local, grad_unreduced_axes, is_sharded, local_of,
                             sharded_axes)
from .chunk import Chunk, TensorInfo, TensorState, default_chunk_numel, pack
from .device import CudaDevice, SimulatedDevice, host_available_bytes
from .manager import ChunkManager, MemoryPlacementError

MEMORY_KINDS = ("device", "host", "auto")
OS_KINDS = ("master", "exp_avg", "exp_avg_sq")

StepFn = Callable[..., None]


@dataclass
class AdamWConfig:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01


def adamw_reference_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                     step: int, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """AdamW on flat tensors, operation for operation as ``torch.optim.AdamW`` (single-tensor path)."""
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    denom = (exp_avg_sq.sqrt() / math.sqrt(bc2)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bc1)


def adamw_fused_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 step: int, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """AdamW on flat tensors with torch's fused kernel (CPU or CUDA); falls back to the reference."""
    if not hasattr(torch, "_fused_adamw_"):
        return adamw_reference_(param, grad, exp_avg, exp_avg_sq, step, lr=lr, beta1=beta1, beta2=beta2,
                                eps=eps, weight_decay=weight_decay)
    st = torch.full((), float(step), dtype=torch.float32, device=param.device)   # a fill: no host sync
    torch._fused_adamw_([param], [grad], [exp_avg], [exp_avg_sq], [], [st], lr=lr, beta1=beta1, beta2=beta2,
                        weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False)


def _agrees(fn: StepFn) -> bool:
    """Whether ``fn`` runs with the flat signature and matches the reference on a small float32 case."""
    try:
        g = torch.Generator().manual_seed(0)
        outs = []
        for f in (fn, adamw_reference_):
            p, m, v = (torch.randn(97, generator=torch.Generator().manual_seed(1)), torch.zeros(97), torch.zeros(97))
            for step in (1, 2):
                f(p, torch.randn(97, generator=g), m, v, step, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                  weight_decay=0.1)
            g = torch.Generator().manual_seed(0)
            outs.append(p)
        return bool(torch.allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6))
    except Exception:  # noqa: BLE001 - any failure means: do not use it
        return False


def default_cpu_step() -> StepFn:
    """The host AdamW kernel.

    The seam for a faster CPU AdamW: ``meshpar.optim.adamw_step_`` or ``meshpar.optim.CPUAdamW.adamw_step_``
    (flat tensors, this module's signature ``f(param, grad, exp_avg, exp_avg_sq, step, *, lr, beta1,
    beta2, eps, weight_decay)``) is used when present and it matches the reference on a small case;
    otherwise torch's fused CPU AdamW (:func:`adamw_fused_`).
    """
    try:
        from .. import optim
    except ImportError:  # pragma: no cover
        return adamw_fused_
    for fn in (getattr(optim, "adamw_step_", None), getattr(getattr(optim, "CPUAdamW", None), "adamw_step_", None)):
        if callable(fn) and _agrees(fn):
            return fn
    return adamw_fused_


@dataclass(eq=False)
class OptimState:
    """This rank's optimizer state for one parameter chunk: shard ``[lo, hi)`` of it."""

    chunk: Chunk
    lo: int
    hi: int
    master: Chunk
    exp_avg: Chunk | None = None
    exp_avg_sq: Chunk | None = None
    location: str = "host"
    step: int = 0
    grad: torch.Tensor | None = None     # ZeRO with clipping: the reduced gradient shard, kept until the step

    def os_chunks(self) -> list[Chunk]:
        return [c for c in (self.master, self.exp_avg, self.exp_avg_sq) if c is not None]


def _select_units(model: nn.Module, units) -> list[tuple[str, nn.Module]]:
    named = list(model.named_modules())
    if units is None:
        out = [(n, m) for n, m in named if any(True for _ in m.parameters(recurse=False))]
    elif isinstance(units, str):
        pats = [units] if isinstance(units, str) else list(units)
        out = [(n, m) for n, m in named if n and any(fnmatch.fnmatchcase(n, p) for p in pats)]
    else:
        ids = {id(m) for m in units}
        out = [(n, m) for n, m in named if id(m) in ids]
    if not out:
        raise ValueError(f"offload: no module of the model matches units={units!r}")
    # drop units nested inside another unit (the outer one owns the parameters)
    keep = []
    for n, m in out:
        if not any(k != n and (n.startswith(k + ".") or k == "") for k, _ in out):
            keep.append((n, m))
    return keep


class Offload:
    """Chunked parameters and a hybrid AdamW for ``model`` (see the module docstring).

    Args:
        model: the model; its ``units`` are hooked from outside (the model code is untouched).
        units: glob over module names (``"h.*"``), a list of modules, or None for every module that
            owns parameters directly. Each unit's parameters are on the device during its forward
            and its backward; units are listed in the order their forwards run.
        memory: where the optimizer state lives: ``"device"``, ``"host"`` or ``"auto"``
            (as many optimizer-state chunks on the device as fit next to the parameter chunks
            and the peak non-model memory recorded in the warm-up step).
        device: a ``SimulatedDevice``/``CudaDevice``, ``"cuda"`` or None (CUDA if available, else a
            simulated device with ``device_budget`` bytes).
        device_budget: bytes for a simulated device, or the capacity of a CUDA device.
        compute_dtype: the dtype parameters have during forward/backward (and gradients).
        master_dtype: the dtype of the master weights and Adam moments.
        chunk_numel: elements per chunk (default: least padding, >= the largest parameter).
        mesh, data_axis: ZeRO over ``data_axis`` of ``mesh``: gradients reduce-scattered (plain
            parameters: mean; ShardedTensor parameters: the global gradient, as ``meshpar.optim.zero``),
            optimizer state sharded, parameters all-gathered after the step. ShardedTensor parameters
            (tensor parallelism) must live on ``mesh`` (when given) and not be split over ``data_axis``.
        host_capacity: bytes the host may hold (default ``MemAvailable``); checked at construction.
        init: for parameters on the meta device, ``init(name, tensor)`` fills the master value in place.
        cpu_step / device_step: flat AdamW kernels ``f(param, grad, exp_avg, exp_avg_sq, step, *, lr,
            beta1, beta2, eps, weight_decay)``; ``cpu_step`` defaults to :func:`default_cpu_step`.
        overlap: run host optimizer steps on a worker thread while the backward continues.
        margin: device bytes kept free beyond the recorded peak (CUDA default 2 GiB, simulated 0).
        warmup_fraction: share of the capacity parameter chunks may use in the warm-up step (CUDA).
        clip_grad_norm: clip the gradients to this global norm before AdamW, exactly as
            ``torch.nn.utils.clip_grad_norm_`` on the dense model (every element counted once over data,
            tensor-parallel and ZeRO shards). Every optimizer step then waits for the end of the backward
            (they run in :meth:`step`, after the norm); :attr:`last_grad_norm` is the norm before clipping.
        step_sync: :meth:`step` waits for the host optimizer steps. By default they may run on into
            the next forward (a chunk is waited for only when a unit needs it; the host-stepped
            chunks are the last layers', needed last).
    """

    def __init__(self, model: nn.Module, units=None, *, memory: str = "auto", device=None,
                 device_budget: int | None = None, compute_dtype: torch.dtype | None = None,
                 master_dtype: torch.dtype | None = None, chunk_numel: int | None = None,
                 lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, mesh=None, data_axis: str = "data",
                 host_capacity: int | None = None, init: Callable[[str, torch.Tensor], None] | None = None,
                 cpu_step: StepFn | None = None, device_step: StepFn | None = None, overlap: bool = True,
                 margin: int | None = None, warmup_fraction: float = 0.3, lookahead: int = 2,
                 step_sync: bool = False, clip_grad_norm: float | None = None):
        if memory not in MEMORY_KINDS:
            raise ValueError(f"memory must be one of {MEMORY_KINDS}, got {memory!r}")
        self.model, self.memory = model, memory
        self.hp = AdamWConfig(lr, tuple(betas), eps, weight_decay)
        if device is None:
            device = "cuda" if torch.cuda.is_available() and device_budget is None else "simulated"
        if device == "cuda":
            device = CudaDevice(capacity=device_budget)
        elif device == "simulated":
            if device_budget is None:
                raise ValueError("a simulated device needs device_budget= (bytes)")
            device = SimulatedDevice(device_budget)
        self.dev = device
        self.margin = (0 if device.simulated else 2 << 30) if margin is None else int(margin)
        self.warmup_fraction = warmup_fraction
        self.mesh, self.data_axis = mesh, data_axis
        self.dp = mesh.size(data_axis) if mesh is not None and data_axis in mesh.names else 1
        self.dp_rank = mesh.axis_index(data_axis) if self.dp > 1 else 0
        self.cpu_step = cpu_step or default_cpu_step()
        self._cpu_step_given = cpu_step is not None  # else fp32-master host steps run in place (cpu_adamw)
        self.device_step = device_step or adamw_fused_
        self.overlap = overlap and self.dp == 1
        self.step_sync = step_sync
        if clip_grad_norm is not None and not clip_grad_norm > 0:
            raise ValueError(f"clip_grad_norm must be a positive number or None, got {clip_grad_norm!r}")
        self.clip_grad_norm = clip_grad_norm
        self.last_grad_norm: torch.Tensor | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="meshpar-cpu-adam") if self.overlap else None

        self.units = _select_units(model, units)
        named, seen, unit_params = [], set(), []
        pname = {id(p): n for n, p in model.named_parameters()}
        for uname, u in self.units:
            ps = []
            for p in u.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    named.append((pname.get(id(p), f"{uname}.?"), p))
                ps.append(p)
            unit_params.append(ps)
        missing = [n for n, p in model.named_parameters() if id(p) not in seen]
        if missing:
            raise ValueError(f"offload: parameters {missing[:5]} (of {len(missing)}) belong to no unit; every "
                             f"parameter must be inside a unit (units={units!r})")
        frozen = [n for n, p in named if not p.requires_grad]
        if frozen:
            raise ValueError(f"offload: parameters {frozen[:5]} do not require grad; freeze nothing or keep them "
                             "out of the offloaded model")
        p0 = named[0][1]
        meta_names = {n for n, p in named if p.is_meta}
        if meta_names:
            named, unit_params = self._swap_meta(model, named, unit_params)
        self.compute_dtype = compute_dtype or (p0.dtype if p0.is_floating_point() else torch.float32)
        self.master_dtype = master_dtype or (torch.float32 if self.compute_dtype in (torch.float16, torch.bfloat16)
                                             else self.compute_dtype)
        self._defer_saved: list[tuple[nn.Parameter, object]] = []
        self._check_sharded([(n, p) for n, p in named if is_sharded(p)], meta_names)
        numels = [local_of(p).numel() for _, p in named]
        align = 64 * self.dp
        self.chunk_numel = chunk_numel or default_chunk_numel(numels, multiple=align)
        if self.chunk_numel % self.dp:
            raise ValueError(f"chunk_numel {self.chunk_numel} must be a multiple of the data size {self.dp}")
        self._check_host(numels, host_capacity)

        # ---- pack parameters into chunks, fill the master shards
        layout = pack(named, self.chunk_numel)
        chunks: list[Chunk] = []
        self.states: list[OptimState] = []
        self.info: dict[int, TensorInfo] = {}
        shard = self.chunk_numel // self.dp
        for ci, entries in enumerate(layout):
            c = Chunk(ci, self.chunk_numel, self.compute_dtype)
            c.host_payload = device.host_empty(c.numel, c.dtype)
            c.host_payload.zero_()
            lo, hi = self.dp_rank * shard, (self.dp_rank + 1) * shard
            master = Chunk(ci, shard, self.master_dtype, kind="master")
            master.host_payload = torch.zeros(shard, dtype=self.master_dtype)
            for name, p, off in entries:
                n = local_of(p).numel()
                ti = TensorInfo(name, p, c, off, n, local_of(p).shape)
                c.tensors.append(ti)
                self.info[id(p)] = ti
                val = self._initial_value(name, p, init, name in meta_names)
                c.host_payload[off:off + n].copy_(val.reshape(-1))
                a, b = max(off, lo), min(off + n, hi)
                if a < b:
                    master.host_payload[a - lo:b - lo].copy_(val.reshape(-1)[a - off:b - off])
                del val
            chunks.append(c)
            self.states.append(OptimState(c, lo, hi, master))
        self.mgr = ChunkManager(device, chunks, budget=0, lookahead=lookahead)
        self.mgr.ready = self._wait_step
        for c in chunks:
            self.mgr.unbind(c)
        self._unit_chunks = [sorted({self.info[id(p)].chunk.index for p in ps}) for ps in unit_params]
        self._unit_params = unit_params
        self._units_of: dict[int, list[int]] = {}
        for ui, ps in enumerate(unit_params):
            for p in ps:
                self._units_of.setdefault(id(p), []).append(ui)
        self.mgr.budget = self._warmup_budget()
        self.mgr.check_fits(self._unit_chunks)
        self.os_device_bytes = 0
        self.warm = False                   # warm-up step done
        self._in_step = False
        self._pending_bwd: dict[int, int] = {}
        self._futures: list[Future] = []
        self._done_chunks: set[int] = set()
        self._handles = []
        self._hook()
        if not device.simulated and getattr(device, "track_nonmodel", False):
            torch.cuda.reset_peak_memory_stats(device.device)   # construction temporaries are not non-model memory

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _swap_meta(model: nn.Module, named, unit_params):
        """Replace meta parameters by new (storage-less placeholder) ``nn.Parameter`` s in every module
        that holds them (a meta tensor cannot take real storage in place); tied ones stay tied."""
        new: dict[int, nn.Parameter] = {}
        for _, p in named:
            if p.is_meta:
                new[id(p)] = nn.Parameter(torch.zeros(1, dtype=p.dtype).expand(p.shape) if p.ndim else
                                          torch.zeros((), dtype=p.dtype), requires_grad=p.requires_grad)
        for m in model.modules():
            for k, v in list(m._parameters.items()):
                if v is not None and id(v) in new:
                    m._parameters[k] = new[id(v)]
        named = [(n, new.get(id(p), p)) for n, p in named]
        unit_params = [[new.get(id(p), p) for p in ps] for ps in unit_params]
        return named, unit_params

    def _check_sharded(self, sharded: list[tuple[str, nn.Parameter]], meta_names: set[str]) -> None:
        """Validate ShardedTensor parameters (tensor parallelism) before anything changes; under ZeRO,
        defer their gradients' sum over the data axis to the chunk reduction (as ``meshpar.optim.zero``)."""
        if not sharded:
            return
        dev_type = torch.device(self.dev.device).type
        for name, p in sharded:
            what = describe(p, name)
            if name in meta_names:
                raise ValueError(f"offload: {what} is a ShardedTensor on the meta device; lay out a materialized "
                                 "model (meta initialisation is for plain parameters)")
            if self.mesh is not None and p.mesh != self.mesh:
                raise ValueError(f"offload: {what} lives on {p.mesh}, but mesh={self.mesh} was given")
            if self.dp > 1 and self.data_axis in sharded_axes(p):
                raise ValueError(f"offload: {what} is split over the data axis {self.data_axis!r}, over which the "
                                 "chunk manager shards (ZeRO) itself; keep only tensor-parallel axes in its spec")
            if p.dtype != self.compute_dtype:
                raise ValueError(f"offload: {what} has dtype {p.dtype} but compute_dtype is {self.compute_dtype}; "
                                 "create ShardedTensor parameters in the compute dtype (the master copy is kept "
                                 "in master_dtype)")
            if p.device.type != dev_type:
                raise ValueError(f"offload: {what} is on {p.device}, the chunk device on {dev_type}; move the model "
                                 "there first (a ShardedTensor's device is fixed)")
        if self.dp > 1:
            for _, p in sharded:
                old = getattr(p, DEFER_ATTR, None)
                self._defer_saved.append((p, old))
                setattr(p, DEFER_ATTR, tuple(dict.fromkeys(tuple(old or ()) + (self.data_axis,))))

    def _local_grad(self, p: nn.Parameter) -> torch.Tensor:
        """The local block of ``p``'s gradient, reduced except over the ZeRO data axis and scaled for the
        chunk's sum over it (:func:`~meshpar.optim.params.grad_factor`, as ``meshpar.optim.zero``)."""
        g = grad_local(p)
        if is_sharded(p):
            zero_axes = (self.data_axis,) if self.dp > 1 else ()
            partial = grad_unreduced_axes(p)
            rest = tuple(a for a in p.mesh.names if a in partial and a not in zero_axes)
            if rest:      # still a partial sum (e.g. parallelize(defer_reduce=...) without ZeRO): sum it here
                from ..mesh import collectives as C
                g = C.all_reduce(g, p.mesh, rest)
        if self.dp > 1:
            alpha = grad_factor(p, self.data_axis, self.dp)
            if alpha != 1.0:
                g = g * alpha
        return g

    def _initial_value(self, name: str, p: nn.Parameter, init, is_meta: bool) -> torch.Tensor:
        if is_meta:
            if init is None:
                raise ValueError(f"offload: parameter {name} is on the meta device; pass init=fn(name, tensor)")
            t = torch.empty(p.shape, dtype=self.master_dtype,
                            device=self.dev.device if not self.dev.simulated else "cpu")
            init(name, t)
            return t.cpu()
        return local_of(p).detach().to(self.master_dtype).cpu()

    def _check_host(self, numels: Sequence[int], host_capacity: int | None) -> None:
        """Raise before the first step when the host cannot hold the state it must hold."""
        c = torch.tensor([], dtype=self.compute_dtype).element_size()
        m = torch.tensor([], dtype=self.master_dtype).element_size()
        n = sum(numels)
        params_host = c * n                       # every parameter chunk has a host copy
        master = m * n // self.dp                 # master shards start on the host
        moments = 2 * m * n // self.dp
        if self.memory == "device":
            need = params_host + master
        elif self.memory == "host":
            need = params_host + master + moments
        else:                                     # auto: at best the device takes what its capacity leaves
            spare = max(0, self.dev.capacity - c * n)
            need = params_host + master + max(0, moments - spare)
        have = host_available_bytes() if host_capacity is None else int(host_capacity)
        self.host_bytes_needed, self.host_bytes_available = need, have
        if need > have:
            gib = 2 ** 30
            raise MemoryPlacementError(
                f"memory={self.memory!r}: the host must hold {need / gib:.2f} GiB ({need} bytes: parameter chunks "
                f"{params_host}, master weights {master}, Adam moments on the host {need - params_host - master}) "
                f"but only {have / gib:.2f} GiB ({have} bytes) are available. Use a smaller model, more data "
                f"ranks (ZeRO shards the optimizer state), or memory='auto' with a larger device.")

    def _warmup_budget(self) -> int:
        cap = self.dev.capacity
        if self.dev.simulated or not getattr(self.dev, "track_nonmodel", True):
            return cap - self.dev.nonmodel - self.margin
        biggest = max((sum(self.mgr.chunks[i].nbytes for i in ids) for ids in self._unit_chunks), default=0)
        return min(cap - self.margin, max(int(cap * self.warmup_fraction), 2 * biggest))

    # ------------------------------------------------------------------ hooks
    def _hook(self) -> None:
        for ui, (_, u) in enumerate(self.units):
            self._handles.append(u.register_forward_pre_hook(self._make_pre(ui)))
            self._handles.append(u.register_forward_hook(self._make_post(ui)))
        for ti in self.info.values():
            self._handles.append(ti.param.register_post_accumulate_grad_hook(self._on_grad))

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _fetch(self, ui: int) -> None:
        ids = self._unit_chunks[ui]
        self.mgr.mark(ids)
        for ci in ids:
            c = self.mgr.chunks[ci]
            c.pins += 1
            self._wait_step(c)
            self.mgr.access(c, protect=set(ids))
        for ci in ids:
            for t in self.mgr.chunks[ci].tensors:
                if t.state == TensorState.HOLD:
                    t.state = TensorState.COMPUTE
        self.mgr.prefetch(protect=set(ids))

    def _release(self, ui: int) -> None:
        for ci in self._unit_chunks[ui]:
            c = self.mgr.chunks[ci]
            c.pins = max(0, c.pins - 1)
            if c.pins == 0:
                for t in c.tensors:
                    if t.state == TensorState.COMPUTE:
                        t.state = TensorState.HOLD

    def _make_pre(self, ui: int):
        def pre(module, args):
            if not self._in_step:
                self._begin_step()
            self._fetch(ui)
        return pre

    def _make_post(self, ui: int):
        def post(module, args, out):
            self._release(ui)
            outs = [t for t in (out if isinstance(out, (tuple, list)) else (out,))
                    if isinstance(t, torch.Tensor) and t.requires_grad]
            if outs and torch.is_grad_enabled():
                # fires when the first gradient w.r.t. an output is ready, before the unit's own backward
                torch.autograd.graph.register_multi_grad_hook(outs, lambda grads: self._bwd_pre(ui), mode="any")
        return post

    def _bwd_pre(self, ui: int) -> None:
        """The backward of unit ``ui`` is about to run: its chunks to the device."""
        self._fetch(ui)
        self._pending_bwd[ui] = len(self._unit_params[ui])

    def _begin_step(self) -> None:
        self._in_step = True
        self.mgr.begin_step()
        self._pending_bwd = {}
        self._done_chunks = set()

    def _on_grad(self, p: nn.Parameter) -> None:
        """The gradient of ``p`` is complete: store it in the parameter's slot (grad reuse)."""
        ti = self.info[id(p)]
        c = ti.chunk
        assert c.device_payload is not None, f"{ti.name}: gradient arrived while its chunk is off the device"
        slot = c.device_payload[ti.offset:ti.offset + ti.numel]
        if ti.has_grad:       # a second backward in one step would overwrite the parameter's slot
            raise RuntimeError(f"offload: a second gradient for {ti.name} in one step; gradient accumulation over "
                               "several backward calls is not supported (call step() after each backward)")
        slot.copy_(self._local_grad(p).reshape(-1))
        p.grad = None
        ti.has_grad = True
        ti.state = TensorState.HOLD_AFTER_BWD
        c.host_valid = False
        for ui in self._units_of[id(p)]:
            if ui in self._pending_bwd:
                self._pending_bwd[ui] -= 1
                if self._pending_bwd[ui] == 0:
                    del self._pending_bwd[ui]
                    self._release(ui)
        if all(t.has_grad for t in c.tensors) and self.warm and self.clip_grad_norm is None:
            self._done_chunks.add(c.index)
            self._step_chunk(self.states[c.index])

    # ------------------------------------------------------------------ optimizer
    def _wait_step(self, c: Chunk) -> None:
        if c.busy is not None:
            c.busy.result()
            c.busy = None
            for t in c.tensors:
                if t.state == TensorState.FREE:
                    t.state = TensorState.HOLD

    def _grad_shard(self, c: Chunk, g: torch.Tensor) -> torch.Tensor:
        if self.dp == 1:
            return g
        from ..mesh import collectives as C
        return C.reduce_scatter(g, self.mesh, self.data_axis)   # the slots were scaled by _local_grad

    def _gather_into(self, c: Chunk, new_shard: torch.Tensor) -> None:
        """Write this rank's new parameter shard and the other ranks' into ``c``'s payload."""
        st = self.states[c.index]
        if self.dp == 1:
            c.payload[st.lo:st.hi].copy_(new_shard)
        else:
            from ..mesh import collectives as C
            c.payload.copy_(C.all_gather(new_shard.contiguous(), self.mesh, self.data_axis))

    def _skip_mask(self, st: OptimState) -> list[tuple[int, int]]:
        """Ranges (shard-relative) of tensors that got no gradient this step (AdamW leaves them alone)."""
        out = []
        for t in st.chunk.tensors:
            if not t.has_grad:
                a, b = max(t.offset, st.lo), min(t.offset + t.numel, st.hi)
                if a < b:
                    out.append((a - st.lo, b - st.lo))
        return out

    def _adam(self, st: OptimState, grad: torch.Tensor, fn: StepFn, skip: list[tuple[int, int]] | None = None,
              coef: torch.Tensor | None = None) -> None:
        skip = self._skip_mask(st) if skip is None else skip
        if coef is not None:                  # gradient clipping: the global coefficient (1.0 leaves it exact)
            grad = grad * coef.to(grad.device, grad.dtype)
        saved = [(a, b, [x.payload[a:b].clone() for x in st.os_chunks()]) for a, b in skip]
        st.step += 1
        b1, b2 = self.hp.betas
        fn(st.master.payload, grad, st.exp_avg.payload, st.exp_avg_sq.payload, st.step, lr=self.hp.lr,
           beta1=b1, beta2=b2, eps=self.hp.eps, weight_decay=self.hp.weight_decay)
        for a, b, vals in saved:
            for x, v in zip(st.os_chunks(), vals):
                x.payload[a:b].copy_(v)

    def _host_step_in_place(self, st: OptimState, seg: torch.Tensor, skip: list[tuple[int, int]]) -> None:
        """One rank, fp32 master, no clipping: AdamW straight from the chunk's host gradients ``seg`` (compute
        dtype), which then receive the new parameters: one pass of
        :func:`meshpar.optim.cpu_adamw.adamw_step_` (the cuda_ops CPU kernel reads the bf16 gradients and writes
        the bf16 parameters over them) instead of a float32 copy of the gradients, the step and a copy back
        (40 -> 28 bytes of host memory traffic per element, and no float32 gradient buffer allocated per chunk
        and step)."""
        from ..optim.cpu_adamw import adamw_step_

        def step(master, grad, m, v, n, *, lr, beta1, beta2, eps, weight_decay):
            out = grad if grad.dtype == torch.bfloat16 else None
            adamw_step_(master, grad, m, v, lr, beta1, beta2, eps, weight_decay, n, bf16_out=out)
            if out is None:
                grad.copy_(master)

        self._adam(st, seg, step, skip)
        for a, b in skip:  # their state was restored: their parameters are the master values again
            seg[a:b].copy_(st.master.payload[a:b])

    def _reduced_grad(self, st: OptimState) -> torch.Tensor:
        """ZeRO: this rank's shard of the chunk's gradient summed over data (brings the chunk to the device;
        kept in ``st.grad`` until the chunk's step takes it)."""
        if st.grad is None:
            c = st.chunk
            self._resident(c)
            st.grad = self._grad_shard(c, c.device_payload)
        return st.grad

    def _resident(self, c: Chunk) -> None:
        """Bring ``c`` to the device (evicting others) if it is not there."""
        if c.device_payload is None:
            c.pins += 1
            self.mgr.access(c)
            c.pins -= 1

    def _grad_norm(self) -> torch.Tensor:
        """The global norm of this step's gradients (collective over the mesh when there is one)."""
        from ..optim.clip import sum_sq_by_axes
        data = (self.data_axis,) if self.dp > 1 else ()
        parts, keys = [], set()
        for st in self.states:
            c = st.chunk
            for t in c.tensors:     # sorted: every rank must issue the per-key reductions in one order
                keys.add(tuple(sorted(data + sharded_axes(t.param))))
            if not any(t.has_grad for t in c.tensors):
                continue
            if self.dp > 1:
                g = self._reduced_grad(st)
            elif c.device_payload is not None:
                g = c.device_payload[st.lo:st.hi]
            else:                       # evicted with its gradients: the host copy, once its download is done
                if c.host_event is not None:
                    c.host_event.wait_host()
                g = c.host_payload[st.lo:st.hi]
            for t in c.tensors:
                a, b = max(t.offset, st.lo), min(t.offset + t.numel, st.hi)
                if t.has_grad and a < b:
                    parts.append((tuple(sorted(data + sharded_axes(t.param))), g[a - st.lo:b - st.lo]))
        mesh = self.mesh if self.mesh is not None else next(
            (t.param.mesh for t in self.info.values() if is_sharded(t.param)), None)
        if mesh is None:                # plain parameters on one rank
            return torch.stack([t.detach().double().pow(2).sum() for _, t in parts]).sum().sqrt()
        return sum_sq_by_axes(parts, mesh, keys)

    def _step_chunk(self, st: OptimState, coef: torch.Tensor | None = None) -> None:
        """Run the optimizer on chunk ``st.chunk`` whose slots hold gradients; the slots get parameters back.
        ``coef``: the gradient clipping coefficient."""
        c = st.chunk
        if st.location == "device":
            if self.dp > 1:
                g, st.grad = self._reduced_grad(st), None
            self._resident(c)                  # (with clipping it may have moved since its reduction)
            if self.dp == 1:
                g = c.device_payload[st.lo:st.hi]
            self._adam(st, g.to(self.master_dtype), self.device_step, coef=coef)
            self._gather_into(c, st.master.payload.to(self.compute_dtype))
            c.host_valid = False
            self._after_step(c)
            return
        # optimizer state on the host
        if self.dp > 1:
            g, st.grad = self._reduced_grad(st), None
            self._adam(st, g.to("cpu", self.master_dtype), self.cpu_step, coef=coef)
            self._resident(c)
            self._gather_into(c, st.master.payload.to(self.compute_dtype).to(c.device_payload.device))
            c.host_valid = False
            self._after_step(c)
            return
        # one rank: the host payload receives the gradients, the CPU steps, the host payload gets parameters
        if c.device_payload is not None:
            ev = self.dev.download(self.mgr._host_buffer(c), c.device_payload)
            self.mgr.stats["downloads"] += 1
            c.device_payload = None
            self.mgr.unbind(c)
        else:
            ev = c.host_event          # evicted with its gradients: the download that wrote the host copy
        c.location, c.host_valid = "host", True
        for t in c.tensors:
            t.state = TensorState.FREE
        skip = self._skip_mask(st)   # read in this thread: has_grad is reset below

        def work():
            if ev is not None:
                ev.wait_host()
            host = c.host_payload
            if coef is None and not self._cpu_step_given and self.master_dtype == torch.float32 \
                    and host.dtype in (torch.bfloat16, torch.float32):
                self._host_step_in_place(st, host[st.lo:st.hi], skip)
                return
            self._adam(st, host[st.lo:st.hi].to(self.master_dtype), self.cpu_step, skip, coef)
            host[st.lo:st.hi].copy_(st.master.payload)

        if self._pool is not None and self.warm:
            c.busy = self._pool.submit(work)
        else:
            work()
            for t in c.tensors:
                t.state = TensorState.HOLD
        for t in c.tensors:
            t.has_grad = False

    def _after_step(self, c: Chunk) -> None:
        for t in c.tensors:
            t.state = TensorState.HOLD
            t.has_grad = False

    def _place_states(self) -> None:
        """Decide where each chunk's optimizer state lives and create the moments (end of warm-up)."""
        peak = self.mgr.peak_nonmodel()
        avail = self.dev.capacity - peak - self.margin
        pbytes = sum(c.nbytes for c in self.mgr.chunks)
        per = [3 * st.master.nbytes for st in self.states]
        if self.memory == "device":
            need = pbytes + sum(per)
            if need > avail:
                raise MemoryPlacementError(
                    f"memory='device': parameter chunks ({pbytes} bytes) and optimizer state ({sum(per)} bytes) "
                    f"need {need} bytes, the device has {avail} (capacity {self.dev.capacity} less non-model peak "
                    f"{peak} and margin {self.margin}); use memory='auto' or 'host'")
            on_dev = set(range(len(self.states)))
        elif self.memory == "host":
            on_dev = set()
        else:
            room = avail - pbytes
            on_dev = set()
            # the chunks stepped last in the backward (first in forward order) step on the device;
            # the others step on the CPU while the backward still runs
            for st, b in zip(self.states, per):
                if b <= room:
                    on_dev.add(st.chunk.index)
                    room -= b
                else:
                    break
        for st in self.states:
            st.location = "device" if st.chunk.index in on_dev else "host"
            if st.location == "device":
                st.master.device_payload = self.dev.empty(st.master.numel, st.master.dtype)
                st.master.device_payload.copy_(st.master.host_payload)
                st.master.host_payload = None
            for kind in ("exp_avg", "exp_avg_sq"):
                ch = Chunk(st.chunk.index, st.master.numel, self.master_dtype, kind=kind)
                if st.location == "device":
                    ch.device_payload = self.dev.empty(ch.numel, ch.dtype).zero_()
                else:
                    ch.host_payload = torch.zeros(ch.numel, dtype=ch.dtype)
                ch.location = st.location
                setattr(st, kind, ch)
            st.master.location = st.location
        os_dev = sum(b for st, b in zip(self.states, per) if st.location == "device")
        self.os_device_bytes = os_dev
        self.mgr.budget = max(0, avail - os_dev)
        self.mgr.check_fits(self._unit_chunks)

    # ------------------------------------------------------------------ public API
    def step(self) -> None:
        """Finish the optimizer step (after ``backward``): steps not yet run, host steps in flight."""
        if not self.warm:
            self.mgr.end_warmup()
            self._place_states()
        coef = None
        if self.clip_grad_norm is not None:
            from ..optim.clip import clip_coef
            self.last_grad_norm = self._grad_norm()
            coef = clip_coef(self.last_grad_norm, self.clip_grad_norm)
        for st in self.states:
            c = st.chunk
            if c.index not in self._done_chunks and any(t.has_grad for t in c.tensors):
                self._step_chunk(st, coef)
            elif not any(t.has_grad for t in c.tensors) and c.index not in self._done_chunks:
                for t in c.tensors:
                    if t.state == TensorState.HOLD_AFTER_BWD:
                        t.state = TensorState.HOLD
        if self.step_sync or not self.warm:
            for c in self.mgr.chunks:
                self._wait_step(c)
        for c in self.mgr.chunks:
            c.pins = 0
            for t in c.tensors:
                if t.state == TensorState.COMPUTE:
                    t.state = TensorState.HOLD
        self.mgr.moment = 0
        self.mgr.prefetch(protect=set())         # start the next step's uploads now
        self.warm = True
        self._in_step = False
        self._done_chunks = set()
        self._pending_bwd = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Gradients live in the chunks and are consumed by :meth:`step`; nothing to clear."""

    def master_params(self) -> dict[str, torch.Tensor]:
        """Name -> this rank's master values on the CPU (ZeRO: all-gathered over data); a ShardedTensor
        parameter's as a ShardedTensor of its layout around the master block (``meshpar.unshard`` gives the
        global value)."""
        self.synchronize()
        out = {}
        full = []
        for st in self.states:
            m = st.master.payload.detach().to("cpu")
            if self.dp > 1:
                from ..mesh import collectives as C
                m = C.all_gather(st.master.payload.contiguous(), self.mesh, self.data_axis).to("cpu")
            full.append(m)
        for ti in self.info.values():
            st = self.states[ti.chunk.index]
            base = full[ti.chunk.index]
            off = ti.offset if self.dp > 1 else ti.offset - st.lo
            val = base[off:off + ti.numel].view(ti.shape).clone()
            if is_sharded(ti.param):
                from ..sharding.api import from_local
                p = ti.param
                val = from_local(val, p.spec, p.mesh, p.shape)
            out[ti.name] = val
        return out

    def synchronize(self) -> None:
        """Wait for copies in flight and host optimizer steps."""
        for c in self.mgr.chunks:
            self._wait_step(c)
        self.dev.synchronize()

    def chunks(self) -> list[Chunk]:
        """Every chunk this rank holds: parameter chunks, then optimizer-state chunks."""
        return list(self.mgr.chunks) + [x for st in self.states for x in st.os_chunks()]

    def close(self) -> None:
        """Remove the hooks, stop the worker thread, give ShardedTensor parameters back their own
        gradient-reduction setting."""
        self.remove_hooks()
        for p, old in self._defer_saved:
            if old is None:
                delattr(p, DEFER_ATTR)
            else:
                setattr(p, DEFER_ATTR, old)
        self._defer_saved = []
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def offload(model: nn.Module, units=None, **kwargs) -> Offload:
    """Hook ``model`` for chunked training under a device budget; returns the :class:`Offload`
    (``.step()`` after each backward). See :class:`Offload` for the arguments."""
    return Offload(model, units, **kwargs)
