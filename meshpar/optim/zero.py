"""``ZeroOptimizer``: data parallelism and ZeRO stages 0-3 around any elementwise torch optimizer.

The layout is specs on the data axis (see ``docs/zero.md``):

========  =====================  ========================  =============================
stage     parameters             gradients                 optimizer state (+ fp32 master)
========  =====================  ========================  =============================
0 (DP)    replicated over data   all-reduced, replicated   replicated
1         replicated             all-reduced, replicated   ``P("data")`` over flat buckets
2         replicated             reduce-scattered          ``P("data")``
3         ``P("data")``          reduce-scattered          ``P("data")``
========  =====================  ========================  =============================

Gradients are copied into flat buckets by post-accumulate-grad hooks and each bucket's
reduction is issued asynchronously as soon as all of its gradients have arrived, so it
overlaps the rest of backward. The end of backward waits for them.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

from ..errors import ShardingError
from ..mesh import Mesh, collectives as C
from . import gather
from .clip import clip_coef, sum_sq_by_axes
from .elementwise import check_elementwise
from .layout import Bucket, Entry, plan_buckets
from .params import DEFER_ATTR, describe, grad_factor, grad_local, is_sharded, local_of, sharded_axes
from .scaler import LossScaler

_LOW = (torch.bfloat16, torch.float16)


class ZeroOptimizer(torch.optim.Optimizer):
    """Wraps ``optimizer`` (built over the model's parameters). Use :func:`zero` to build one.

    After construction the inner optimizer steps flat master buckets, not the model's
    parameters; the model's parameters are views into flat parameter buckets (stages 0-2) or
    are gathered on demand (stage 3).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, mesh: Mesh, *, stage: int = 0, axis: str = "data",
                 bucket_mb: float = 25.0, module: torch.nn.Module | None = None,
                 compute_dtype: torch.dtype | None = None, master_dtype: torch.dtype | None = None,
                 loss_scale: float | str | None = "auto", max_grad_norm: float | None = None,
                 grad_reduce: str = "auto", prefetch: bool = True, stage_axes: tuple[str, ...] = ()) -> None:
        # ---------------------------------------------------------- validation (no communication)
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage!r}")
        if axis not in mesh.names:
            raise ShardingError(f"data axis {axis!r} is not in the mesh {mesh} (axes {mesh.names}); pass "
                                f"axis=<one of {mesh.names}> or build the mesh with a {axis!r} axis")
        if grad_reduce not in ("auto", "sum", "mean"):
            raise ValueError(f"grad_reduce must be 'auto', 'sum' or 'mean', got {grad_reduce!r}")
        stage_axes = tuple(mesh.check_axes(stage_axes)) if stage_axes else ()
        if axis in stage_axes:
            raise ValueError(f"stage_axes {stage_axes} must not contain the data axis {axis!r}")
        check_elementwise(optimizer)
        if stage == 3 and module is None:
            raise ValueError("ZeRO stage 3 needs module=<the model>: parameters are gathered by module hooks")
        names = {id(p): n for n, p in module.named_parameters()} if module is not None else {}
        named: list[tuple[int, str, torch.Tensor]] = []
        for g, group in enumerate(optimizer.param_groups):
            for i, p in enumerate(group["params"]):
                if p.requires_grad:
                    named.append((g, names.get(id(p), f"group{g}.param{i}"), p))
        self._validate_params(named, mesh, axis, stage, module, compute_dtype)

        self.inner = optimizer
        self.mesh, self.axis, self.stage = mesh, axis, stage
        self.nd = mesh.size(axis)
        self.grad_reduce = grad_reduce
        self.max_grad_norm = max_grad_norm
        self.stage_axes = stage_axes
        self.prefetch = prefetch
        self.module = module
        pdt = {local_of(p).dtype for _, _, p in named}
        low = compute_dtype if compute_dtype is not None else (pdt.pop() if len(pdt) == 1 and pdt <= set(_LOW) else None)
        self.compute_dtype = compute_dtype
        self.master_dtype = master_dtype or (torch.float32 if low in _LOW else None)
        if loss_scale == "auto":
            loss_scale = "dynamic" if low == torch.float16 else None
        self.scaler: LossScaler | None = None
        if loss_scale == "dynamic":
            self.scaler = LossScaler()
        elif isinstance(loss_scale, (int, float)):
            self.scaler = LossScaler(scale=float(loss_scale), growth_interval=1 << 62, backoff=1.0)

        # ---------------------------------------------------------- layout
        owner = mesh.coord(axis)
        bucket_bytes = int(bucket_mb * 2 ** 20)
        if stage == 3:
            order, self._units = gather.unit_order(module, named)
            self.buckets = plan_buckets(order, self.nd, owner, bucket_bytes, split_every=True)
            self._launch_order = list(reversed(range(len(self.buckets))))
        else:
            self._units = None
            self.buckets = plan_buckets(list(reversed(named)), self.nd, owner, bucket_bytes)
            self._launch_order = list(range(len(self.buckets)))
        self._where: dict[int, tuple[Bucket, Entry]] = {}
        for b in self.buckets:
            self._materialize(b)
            for e in b.entries:
                self._where[id(e.param)] = (b, e)
        for g, group in enumerate(optimizer.param_groups):
            group["params"] = [b.master for b in self.buckets if b.group == g]
        optimizer.state.clear()

        # ---------------------------------------------------------- hooks and per-backward state
        self._sync = True
        self._in_backward = False
        self._next = 0
        self._prepared = False
        self._exposed: set[int] = set()
        self._handles: list[Any] = []
        self._gathered_ptr: dict[int, Bucket] = {}  # stage 3: storage of a gathered bucket -> bucket
        self._saved_ctx: list[tuple[int, Any]] = []  # stage 3: saved-tensor hooks of running forwards
        self._packed = 0  # stage 3: saved tensors kept as bucket coordinates (a debug statistic)
        for b in self.buckets:
            for e in b.entries:
                p = e.param
                if is_sharded(p) and axis not in sharded_axes(p):
                    setattr(p, DEFER_ATTR, (axis,))
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))
                if stage <= 1:
                    self._handles.append(p.register_hook(self._make_pre_hook(p)))
        if stage == 3:
            self._handles += gather.install(self)

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _validate_params(named, mesh: Mesh, axis: str, stage: int, module, compute_dtype) -> None:
        if not named:
            raise ValueError("meshpar.optim.zero: the optimizer has no parameters that require grad")
        seen = set()
        for _, name, p in named:
            if id(p) in seen:
                raise ValueError(f"{describe(p, name)} appears twice in the optimizer's param groups")
            seen.add(id(p))
            if is_sharded(p):
                if p.mesh != mesh:
                    raise ShardingError(f"{describe(p, name)} lives on {p.mesh}, the optimizer on {mesh}")
                if axis in sharded_axes(p):
                    raise ShardingError(
                        f"{describe(p, name)} is already sharded over the data axis {axis!r}; ZeRO stage {stage} "
                        f"shards optimizer state over {axis!r} itself. Remove {axis!r} from the parameter's spec "
                        f"(keep only its tensor-parallel axes), or use another axis name for this parameter.")
                if compute_dtype is not None and p.dtype != compute_dtype:
                    raise ShardingError(
                        f"{describe(p, name)} has dtype {p.dtype}; create ShardedTensor parameters directly in "
                        f"compute_dtype={compute_dtype} (the fp32 master copy is kept by the optimizer)")
        if stage == 3:
            owned = {id(p) for p in module.parameters()}
            for _, name, p in named:
                if id(p) not in owned:
                    raise ValueError(f"stage 3: {describe(p, name)} is in the optimizer but not in module")

    def _materialize(self, b: Bucket) -> None:
        """Build the bucket's flat params and master, and alias the params' storage into them."""
        first = local_of(b.entries[0].param)
        dt = self.compute_dtype or first.dtype
        b.dtype = dt
        mdt = self.master_dtype or dt
        dev = first.device
        full = torch.zeros(b.padded, dtype=dt, device=dev)
        master_full = torch.zeros(b.padded, dtype=mdt, device=dev) if mdt != dt else None
        with torch.no_grad():
            for e in b.entries:
                src = local_of(e.param).detach().reshape(-1)
                full[e.offset:e.offset + e.numel].copy_(src)
                if master_full is not None:
                    master_full[e.offset:e.offset + e.numel].copy_(src)
        lo, hi = b.lo, b.hi
        if self.stage == 3:
            b.flat = full[lo:hi].clone()
            del full
            b.master = b.flat if master_full is None else master_full[lo:hi].clone()
            for e in b.entries:
                local_of(e.param).data = torch.empty(0, dtype=dt, device=dev)
            return
        b.flat = full
        for e in b.entries:
            local_of(e.param).data = full[e.offset:e.offset + e.numel].view(e.shape)
        if master_full is None:
            b.master = full if self.stage == 0 else full[lo:hi]
        else:
            b.master = master_full if self.stage == 0 else master_full[lo:hi].clone()

    # ------------------------------------------------------------------ backward
    def _make_pre_hook(self, p: torch.Tensor) -> Callable:
        def pre(grad):
            # a grad we exposed is a view into the reduced bucket; the next backward must not
            # accumulate into it, so detach it before AccumulateGrad runs
            if id(p) in self._exposed:
                p.grad = None
                self._exposed.discard(id(p))
            return None
        return pre

    def _factor(self, p: torch.Tensor) -> float:
        return grad_factor(p, self.axis, self.nd, self.grad_reduce)

    def _on_grad(self, p: torch.Tensor) -> None:
        b, e = self._where[id(p)]
        if not self._in_backward:
            self._in_backward = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
        g = grad_local(p)
        if g is None:
            return
        alpha = self._factor(p)
        with torch.no_grad():
            if b.grad_buf is None:
                b.grad_buf = torch.zeros(b.padded, dtype=b.dtype, device=g.device)
            b.grad_buf[e.offset:e.offset + e.numel].add_(g.reshape(-1), alpha=alpha)
        p.grad = None
        b.seen.add(id(p))
        if len(b.seen) == len(b.entries):
            if self.stage == 3:
                gather.free(b, self)
            if self._sync:
                self._launch_ready()

    def _launch_ready(self) -> None:
        order = self._launch_order
        while self._next < len(order):
            b = self.buckets[order[self._next]]
            if len(b.seen) < len(b.entries):
                return
            self._launch(b)
            self._next += 1

    def _launch(self, b: Bucket) -> None:
        buf = b.grad_buf if b.grad_buf is not None else torch.zeros(b.padded, dtype=b.dtype, device=b.flat.device)
        with C.op_name(f"zero{self.stage} grad bucket {b.index}"):
            if self.stage <= 1:
                b.pending = C.all_reduce(buf, self.mesh, self.axis, async_op=True, inplace=True)
            else:
                b.pending = C.reduce_scatter(buf, self.mesh, self.axis, 0, async_op=True)
        b.grad_buf = None  # the collective owns the buffer now (reduced in place)

    def _end_backward(self) -> None:
        self._in_backward = False
        if self._sync:
            for i in self._launch_order[self._next:]:
                self._launch(self.buckets[i])
            self._next = len(self._launch_order)
            for b in self.buckets:
                if b.pending is not None:
                    r = b.pending.wait()
                    b.pending = None
                    b.grad = r if b.grad is None else b.grad.add_(r)
            self._next = 0
            self._prepared = False
            if self.stage <= 1:
                self._expose_grads()
        for b in self.buckets:
            b.seen.clear()
        if self.stage == 3:
            gather.end_backward(self)

    def _expose_grads(self) -> None:
        """Stages 0-1: ``p.grad`` becomes a view of the reduced bucket (no copy)."""
        for b in self.buckets:
            if b.grad is None:
                continue
            for e in b.entries:
                p = e.param
                view = b.grad[e.offset:e.offset + e.numel].view(e.shape)
                p.grad = type(p)(view, p.spec, p.mesh, p.shape) if is_sharded(p) else view
                self._exposed.add(id(p))

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate local gradients without reducing them (the next synced backward reduces the sum)."""
        old, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = old

    # ------------------------------------------------------------------ step
    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * scale`` under fp16 dynamic loss scaling, else ``loss``."""
        return loss * self.scaler.scale if self.scaler is not None else loss

    @property
    def loss_scale(self) -> float:
        return self.scaler.scale if self.scaler is not None else 1.0

    def _owned_range(self, b: Bucket) -> tuple[int, int]:
        return (b.lo, b.hi) if self.stage >= 1 else (0, b.padded)

    @torch.no_grad()
    def _prepare(self) -> None:
        """Give each master bucket its (unscaled, master-dtype) gradient slice."""
        if self._prepared:
            return
        inv = 1.0 / self.scaler.scale if self.scaler is not None else 1.0
        for b in self.buckets:
            if b.grad is None:
                b.master.grad = None
                continue
            g = b.grad[b.lo:b.hi] if self.stage == 1 else b.grad
            if g.dtype != b.master.dtype:
                g = g.to(b.master.dtype)
            if inv != 1.0:
                g.mul_(inv)
            b.master.grad = g
        self._prepared = True

    @torch.no_grad()
    def found_inf(self) -> bool:
        """Whether any rank's gradients hold inf/NaN (all-reduced over every mesh axis)."""
        self._prepare()
        # one flag computed on the device, one host read for the whole step (not one per bucket)
        bad = [(~torch.isfinite(b.master.grad)).any() for b in self.buckets if b.master.grad is not None]
        flag = torch.stack(bad).any().to(torch.float32).reshape(1) if bad else \
            torch.zeros(1, dtype=torch.float32, device=self.buckets[0].flat.device)
        return bool(C.all_reduce(flag, self.mesh, self.mesh.names, op="max")[0] > 0)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale gradients to global norm ``max_norm`` (over all shards and axes, and summed over the
        ``stage_axes`` whose ranks hold different parameters); returns the norm."""
        self._prepare()
        data = (self.axis,) if self.stage >= 1 else ()
        parts, keys = [], set()
        for b in self.buckets:
            lo, hi = self._owned_range(b)
            for e in b.entries:
                ax = tuple(sorted(data + sharded_axes(e.param)))
                keys.add(ax)
                r = e.range_in(lo, hi)
                if r is not None and b.master.grad is not None:
                    parts.append((ax, b.master.grad[r[0] - lo:r[1] - lo]))
        norm = sum_sq_by_axes(parts, self.mesh, keys, disjoint_axes=self.stage_axes)
        coef = clip_coef(norm, max_norm)
        grads = [b.master.grad for b in self.buckets if b.master.grad is not None]
        if grads:
            torch._foreach_mul_(grads, coef.to(device=grads[0].device, dtype=grads[0].dtype))
        return norm

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> bool:
        """One optimizer step. Returns False when fp16 overflow made every rank skip it."""
        if closure is not None:
            raise ValueError("ZeroOptimizer.step does not take a closure")
        self._prepare()
        if self.scaler is not None:
            if self.found_inf():
                self.scaler.update(True)
                self.zero_grad()
                return False
        if self.max_grad_norm is not None:
            self.clip_grad_norm_(self.max_grad_norm)
        self.inner.step()
        self._write_back()
        if self.scaler is not None:
            self.scaler.update(False)
        for b in self.buckets:  # drop master-dtype grad copies (views of b.grad are kept)
            if b.master.grad is not None and b.grad is not None and b.master.grad.dtype != b.grad.dtype:
                b.master.grad = None
        self._prepared = False
        return True

    def _write_back(self) -> None:
        pending = []
        for b in self.buckets:
            if self.stage == 3 or self.stage == 0:
                if b.master is not b.flat:
                    b.flat.copy_(b.master)
                continue
            own = b.flat[b.lo:b.hi]
            if b.master.data_ptr() != own.data_ptr():
                own.copy_(b.master)
            with C.op_name(f"zero{self.stage} param all-gather bucket {b.index}"):
                pending.append((b, C.all_gather(own, self.mesh, self.axis, 0, async_op=True)))
        for b, h in pending:
            b.flat.copy_(h.wait())
        if self.stage == 3:
            gather.invalidate(self)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for b in self.buckets:
            b.grad = None
            b.grad_buf = None
            b.master.grad = None
            for e in b.entries:
                if id(e.param) in self._exposed:
                    e.param.grad = None
        self._exposed.clear()
        self._prepared = False

    # ------------------------------------------------------------------ Optimizer look-alike
    @property
    def param_groups(self) -> list[dict]:  # type: ignore[override]
        return self.inner.param_groups

    @property
    def state(self):  # type: ignore[override]
        return self.inner.state

    @property
    def defaults(self) -> dict:  # type: ignore[override]
        return self.inner.defaults

    def state_dict(self) -> dict:  # type: ignore[override]
        from .state import full_optim_state_dict
        return full_optim_state_dict(self)

    def load_state_dict(self, sd: dict) -> None:  # type: ignore[override]
        from .state import load_full_optim_state_dict
        load_full_optim_state_dict(self, sd)

    def add_param_group(self, param_group: dict) -> None:  # type: ignore[override]
        raise NotImplementedError("ZeroOptimizer: add every param group to the torch optimizer before wrapping it")

    def __repr__(self) -> str:
        return (f"ZeroOptimizer(stage={self.stage}, axis={self.axis!r}, nd={self.nd}, buckets={len(self.buckets)}, "
                f"inner={type(self.inner).__name__})")

    def __getstate__(self):
        raise TypeError("a ZeroOptimizer cannot be pickled; use its state_dict()")

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def zero(optimizer: torch.optim.Optimizer, mesh: Mesh, stage: int = 0, axis: str = "data", bucket_mb: float = 25.0,
         **kwargs: Any) -> ZeroOptimizer:
    """Data parallelism (stage 0) or ZeRO stage 1/2/3 around ``optimizer`` on ``mesh``'s ``axis``.

    Args:
        optimizer: a torch.optim optimizer with an elementwise step (SGD, Adam, AdamW, ...), built
            over the model's parameters (plain tensors or ShardedTensors without ``axis`` in their spec).
        mesh: the device mesh; ``axis`` must be one of its axes.
        stage: 0 = DP, 1 = shard optimizer state, 2 = + gradients, 3 = + parameters (needs ``module=``).
        bucket_mb: size of gradient buckets (stages 0-2; stage 3 uses one bucket per module).
        module: the model (required for stage 3; gives parameter names otherwise).
        compute_dtype: cast parameters to this dtype (bf16/fp16) and keep fp32 masters.
        master_dtype: dtype of the master copy (default fp32 when params are bf16/fp16).
        loss_scale: "auto" (dynamic for fp16), "dynamic", a float (static) or None.
        max_grad_norm: clip by global norm inside :meth:`ZeroOptimizer.step`.
        grad_reduce: "auto" (plain-tensor grads averaged over data as DDP does, partial
            ShardedTensor grads summed), "sum" or "mean".
        stage_axes: mesh axes whose ranks hold *different* parameters (pipeline stages, ``("pipe",)``):
            the gradient norm for clipping sums their parts.
    """
    return ZeroOptimizer(optimizer, mesh, stage=stage, axis=axis, bucket_mb=bucket_mb, **kwargs)
