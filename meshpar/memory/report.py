"""Per-rank memory accounting of model states: parameters, gradients, optimizer state, buffers.

Each physical storage is counted once, in the first category that reaches it (params, then
grads, then optimizer state), so views — a parameter aliased into a ZeRO bucket, a stage-1
master that *is* the owned slice of the parameter bucket — are never double counted. Nothing is
registered globally: pass the model and/or the optimizer.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

import torch


@dataclass
class MemoryReport:
    """Bytes held by this rank."""

    params: int = 0
    grads: int = 0
    optimizer_state: int = 0
    buffers: int = 0

    @property
    def model_states(self) -> int:
        """params + grads + optimizer state (the quantity the ZeRO formulas describe)."""
        return self.params + self.grads + self.optimizer_state

    @property
    def total(self) -> int:
        return self.model_states + self.buffers

    def as_dict(self) -> dict[str, int]:
        d = asdict(self)
        d["model_states"] = self.model_states
        d["total"] = self.total
        return d

    def __str__(self) -> str:
        mib = 2 ** 20
        return ("params {:.2f} MiB, grads {:.2f} MiB, optimizer state {:.2f} MiB, buffers {:.2f} MiB, "
                "total {:.2f} MiB").format(self.params / mib, self.grads / mib, self.optimizer_state / mib,
                                           self.buffers / mib, self.total / mib)


class _Seen:
    def __init__(self) -> None:
        self._ptrs: set[tuple[str, int]] = set()

    def bytes(self, tensors: Iterable[torch.Tensor | None]) -> int:
        n = 0
        for t in tensors:
            if t is None or not isinstance(t, torch.Tensor):
                continue
            if hasattr(t, "_local") and hasattr(t, "spec"):
                t = t._local
            st = t.untyped_storage()
            key = (str(t.device), st.data_ptr())
            if st.nbytes() == 0 or key in self._ptrs:
                continue
            self._ptrs.add(key)
            n += st.nbytes()
        return n


def _state_tensors(state: dict) -> list[torch.Tensor]:
    out = []
    for s in state.values():
        if isinstance(s, dict):
            out += [v for v in s.values() if isinstance(v, torch.Tensor)]
    return out


def memory_report(optimizer: torch.optim.Optimizer | None = None, model: torch.nn.Module | None = None) -> MemoryReport:
    """Bytes of params, grads, optimizer state and buffers held by this rank.

    With a :class:`~meshpar.optim.ZeroOptimizer` the flat buckets are counted (parameter buckets,
    reduced and in-flight gradient buckets, master copies and the inner optimizer's state), plus any
    gradient still attached to a parameter. With a plain optimizer or a model, the tensors it holds.
    """
    seen = _Seen()
    rep = MemoryReport()
    zo = optimizer if optimizer is not None and hasattr(optimizer, "buckets") else None
    if zo is not None:
        rep.params = seen.bytes([b.flat for b in zo.buckets] + [b.gathered for b in zo.buckets])
        grads = [b.grad for b in zo.buckets] + [b.grad_buf for b in zo.buckets]
        grads += [e.param.grad for b in zo.buckets for e in b.entries]
        rep.grads = seen.bytes(grads)
        masters = [b.master for b in zo.buckets] + [b.master.grad for b in zo.buckets]
        rep.optimizer_state = seen.bytes(masters + _state_tensors(zo.inner.state))
    elif optimizer is not None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        rep.params = seen.bytes(params)
        rep.grads = seen.bytes([p.grad for p in params])
        rep.optimizer_state = seen.bytes(_state_tensors(optimizer.state))
    if model is not None:
        rep.params += seen.bytes(list(model.parameters()))
        rep.grads += seen.bytes([p.grad for p in model.parameters()])
        rep.buffers = seen.bytes(list(model.buffers()))
    return rep


@dataclass
class ChunkRow:
    """One chunk: which parameter chunk it belongs to, what it holds, where it is, its bytes."""

    chunk: int
    kind: str
    location: str
    nbytes: int
    states: dict[str, int]
    tensors: int


@dataclass
class ChunkReport:
    """Where every chunk of an :class:`~meshpar.memory.offload.Offload` lives (this rank)."""

    rows: list[ChunkRow]
    device_budget: int
    device_bytes: int
    host_bytes: int
    stats: dict[str, int]

    def __str__(self) -> str:
        mib = 2 ** 20
        lines = [f"{'chunk':>5} {'kind':<11} {'where':<7} {'MiB':>9}  states"]
        for r in self.rows:
            st = ", ".join(f"{k} {v}" for k, v in sorted(r.states.items())) or "-"
            lines.append(f"{r.chunk:>5} {r.kind:<11} {r.location:<7} {r.nbytes / mib:>9.2f}  {st}")
        lines.append(f"device {self.device_bytes / mib:.2f} MiB (parameter-chunk budget {self.device_budget / mib:.2f} "
                     f"MiB), host {self.host_bytes / mib:.2f} MiB; moves {self.stats}")
        return "\n".join(lines)


def report(offload) -> ChunkReport:
    """Where every chunk lives: parameter chunks (compute dtype, holding parameters or gradients)
    and this rank's optimizer-state chunks (``master``, ``exp_avg``, ``exp_avg_sq``)."""
    rows = []
    dev = host = 0
    for c in offload.chunks():
        where = "device" if c.device_payload is not None else "host"
        if c.kind == "param" and c.busy is not None:
            where = "host"
        rows.append(ChunkRow(c.index, c.kind, where, c.nbytes, c.states(), len(c.tensors)))
        if c.device_payload is not None:
            dev += c.nbytes
        if c.host_payload is not None:
            host += c.nbytes
    return ChunkReport(rows, offload.mgr.budget, dev, host, dict(offload.mgr.stats))
