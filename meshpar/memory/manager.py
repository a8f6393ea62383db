"""The chunk manager: residency of parameter chunks under a device budget.

* :meth:`ChunkManager.access` brings a chunk to the device (waiting for a prefetch in flight or a
  host optimizer step that writes it), evicting others when the budget is full.
* Eviction picks the movable chunk whose **next use is furthest away** according to the access
  trace recorded in the warm-up step (Belady's rule; the trace repeats every step). Before a trace
  exists it evicts the least recently used chunk.
* :meth:`ChunkManager.prefetch` starts uploads for the chunks of the next moments on the side
  stream, into free budget or in place of a chunk needed later than the prefetched one.
* The warm-up step also records the non-model memory (activations, temporaries) at every moment
  (op boundary = a unit's forward or backward); its peak sizes the budget afterwards.

Eviction downloads a chunk only when the host copy is stale (``host_valid``): parameters that
only were read since their last upload are dropped for free.
"""
from __future__ import annotations

import bisect
from typing import Sequence

import torch

from ..optim.params import local_of
from .chunk import Chunk, TensorState


def set_storage(p: torch.Tensor, value: torch.Tensor) -> None:
    """``p.data = value`` for a plain parameter; for a ShardedTensor, its local block's ``.data``, and the
    block the sharding core entered into autograd for it (``_ent``, kept across forwards while the block's
    storage is unchanged) is dropped: the next forward enters it afresh, so the entered block's autograd
    node is created in that forward (the backward accumulates the parameter's gradient when its unit's
    backward runs, not after every later-created node) and holds no reference to a payload moved away."""
    loc = local_of(p)
    loc.data = value
    if loc is not p:
        p._ent = None


class MemoryPlacementError(MemoryError):
    """The placement cannot work: the numbers (bytes needed vs available) are in the message."""


class ChunkManager:
    """Residency of ``chunks`` (parameter chunks) on ``device`` within ``budget`` bytes.

    Args:
        device: a :class:`~.device.SimulatedDevice` or :class:`~.device.CudaDevice`.
        chunks: the parameter chunks, all starting on the host.
        budget: bytes of parameter chunks allowed on the device (updated after warm-up).
        lookahead: moments ahead that :meth:`prefetch` looks at.
    """

    def __init__(self, device, chunks: Sequence[Chunk], budget: int, lookahead: int = 2):
        self.device = device
        self.chunks = list(chunks)
        self.budget = int(budget)
        self.lookahead = lookahead
        self.moment = 0
        self.recording = True                       # warm-up: record the trace
        self.trace: list[tuple[int, ...]] = []      # moment -> chunk indices accessed
        self.nonmodel: list[int] = []               # moment -> non-model bytes on the device
        self._uses: dict[int, list[int]] = {}       # chunk -> sorted moments (after warm-up)
        self.stats = {"uploads": 0, "downloads": 0, "evictions": 0, "prefetches": 0, "prefetch_hits": 0}
        self.evict_log: list[int] = []              # chunk indices in eviction order (tests)
        self._poison: dict[tuple, torch.Tensor] = {}
        self.ready = lambda c: (c.busy.result(), setattr(c, "busy", None))   # the owner replaces it

    # ------------------------------------------------------------------ accounting
    @property
    def used(self) -> int:
        """Bytes of parameter chunks on the device (including uploads in flight)."""
        return sum(c.nbytes for c in self.chunks if c.device_payload is not None)

    def free_bytes(self) -> int:
        return self.budget - self.used

    # ------------------------------------------------------------------ trace
    def begin_step(self) -> None:
        self.moment = 0

    def mark(self, chunk_ids: Sequence[int]) -> None:
        """A moment (a unit's forward or backward) that uses ``chunk_ids`` starts now."""
        if self.recording:
            self.trace.append(tuple(chunk_ids))
            self.nonmodel.append(self.device.nonmodel_bytes(self.used))
        self.moment += 1

    def end_warmup(self) -> None:
        """Freeze the trace: from now on eviction is by next use and prefetch is on."""
        self.recording = False
        self._uses = {}
        for t, ids in enumerate(self.trace):
            for c in ids:
                self._uses.setdefault(c, []).append(t)

    @property
    def period(self) -> int:
        return max(1, len(self.trace))

    def next_use(self, chunk: int, after: int) -> float:
        """Moment of the next use of ``chunk`` strictly after moment ``after`` (the trace repeats)."""
        uses = self._uses.get(chunk)
        if not uses:
            return float("inf")
        t = after % self.period
        base = after - t
        i = bisect.bisect_right(uses, t)
        return base + (uses[i] if i < len(uses) else uses[0] + self.period)

    def peak_nonmodel(self) -> int:
        return max(self.nonmodel, default=0)

    # ------------------------------------------------------------------ binding
    def poison(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """A NaN tensor of ``shape`` with one element of storage: what a parameter is while its
        chunk is off the device (using it by mistake gives NaN or a device error, never stale values)."""
        key = (dtype, str(self.device.device))
        if key not in self._poison:
            self._poison[key] = torch.full((1,), float("nan"), dtype=dtype, device=self.device.device)
        base = self._poison[key]
        return base.expand(shape) if len(shape) else base.view(())

    def bind(self, c: Chunk) -> None:
        """Point every parameter of ``c`` (a ShardedTensor's local block) at its slot of the device payload."""
        for t in c.tensors:
            set_storage(t.param, c.device_payload[t.offset:t.offset + t.numel].view(t.shape))

    def unbind(self, c: Chunk) -> None:
        """Make every parameter of ``c`` (a ShardedTensor's local block) a NaN placeholder."""
        for t in c.tensors:
            set_storage(t.param, self.poison(t.shape, c.dtype))

    # ------------------------------------------------------------------ movement
    def _host_buffer(self, c: Chunk) -> torch.Tensor:
        if c.host_payload is None:
            c.host_payload = self.device.host_empty(c.numel, c.dtype)
        return c.host_payload

    def evict(self, c: Chunk) -> None:
        """Move ``c`` to the host (download only if the host copy is stale)."""
        assert c.device_payload is not None and c.movable, f"chunk {c.index} is not movable"
        if c.pending is not None:
            c.pending.wait_stream()
            c.pending = None
        if not c.host_valid:
            # no host sync: readers of the host copy wait for c.host_event (uploads on the GPU, the CPU step on the host)
            c.host_event = self.device.download(self._host_buffer(c), c.device_payload)
            self.stats["downloads"] += 1
            c.host_valid = True
        c.device_payload = None
        c.location = "host"
        self.unbind(c)
        self.stats["evictions"] += 1
        self.evict_log.append(c.index)

    def _victim(self, protect: set[int], than: float | None = None) -> Chunk | None:
        """The movable resident chunk used furthest in the future (LRU before the trace exists);
        with ``than``, only one whose next use is later than ``than``."""
        cands = [c for c in self.chunks if c.device_payload is not None and c.movable and c.index not in protect]
        if not cands:
            return None
        if self._uses:
            key = {c.index: self.next_use(c.index, self.moment - 1) for c in cands}
            best = max(cands, key=lambda c: (key[c.index], c.index))
            if than is not None and not key[best.index] > than:
                return None
            return best
        if than is not None:
            return None
        return min(cands, key=lambda c: (c.last_use, c.index))

    def make_room(self, nbytes: int, protect: set[int], than: float | None = None) -> bool:
        """Evict until ``nbytes`` fit in the budget. False (nothing evicted beyond need) if it cannot."""
        while self.free_bytes() < nbytes:
            v = self._victim(protect, than)
            if v is None:
                return False
            self.evict(v)
        return True

    def _start_upload(self, c: Chunk) -> None:
        if c.busy is not None:                  # a host optimizer step is writing the host payload
            self.ready(c)
        c.device_payload = self.device.empty(c.numel, c.dtype)
        c.pending = self.device.upload(c.device_payload, c.host_payload, after=c.host_event)
        c.location = "device"
        c.host_valid = True
        self.stats["uploads"] += 1

    def access(self, c: Chunk, protect: set[int] | None = None) -> None:
        """Make ``c`` resident and bound (its parameters point at device memory), usable on the main stream.

        Raises:
            MemoryPlacementError: when the chunks in use already fill the budget.
        """
        c.last_use = self.moment
        if c.device_payload is None:
            if not self.make_room(c.nbytes, (protect or set()) | {c.index}):
                in_use = [x.index for x in self.chunks if x.device_payload is not None and not x.movable]
                raise MemoryPlacementError(
                    f"chunk {c.index} ({c.nbytes} bytes) does not fit: the device budget is {self.budget} bytes "
                    f"and chunks {in_use} ({self.used} bytes) are in use; a unit needs more chunks at once than "
                    "the budget holds. Give the device more memory, use smaller units or a smaller chunk_numel.")
            self._start_upload(c)
        elif c.pending is not None:
            self.stats["prefetch_hits"] += 1
        if c.pending is not None:
            c.pending.wait_stream()
            c.pending = None
        self.bind(c)

    def prefetch(self, protect: set[int]) -> None:
        """Start uploads for the chunks of the next ``lookahead`` moments (after warm-up only), then,
        while free budget remains, for any chunk off the device (soonest next use first): parameters
        updated by a host step go back to the device as soon as the step is done."""
        if not self._uses:
            return
        self._prefetch_next(protect)
        waiting = [c for c in self.chunks if c.device_payload is None and (c.busy is None or c.busy.done())]
        waiting.sort(key=lambda c: self.next_use(c.index, self.moment - 1))
        for c in waiting:
            if c.nbytes > self.free_bytes():
                break
            self._start_upload(c)
            self.stats["prefetches"] += 1

    def _prefetch_next(self, protect: set[int]) -> None:
        for k in range(1, self.lookahead + 1):
            t = self.moment - 1 + k
            for ci in self.trace[t % self.period]:
                c = self.chunks[ci]
                if c.device_payload is not None:
                    continue
                if c.busy is not None and not c.busy.done():
                    continue
                need = self.next_use(ci, self.moment - 1)
                if not self.make_room(c.nbytes, protect | {ci}, than=need):
                    return
                self._start_upload(c)
                self.stats["prefetches"] += 1

    def check_fits(self, unit_chunks: Sequence[Sequence[int]]) -> None:
        """Raise when one unit's chunks alone exceed the budget."""
        for ids in unit_chunks:
            need = sum(self.chunks[i].nbytes for i in ids)
            if need > self.budget:
                raise MemoryPlacementError(
                    f"a unit needs chunks {list(ids)} ({need} bytes) at once but the device budget for parameter "
                    f"chunks is {self.budget} bytes; use finer units or a smaller chunk_numel")


def all_hold(c: Chunk) -> bool:
    return all(t.state == TensorState.HOLD for t in c.tensors)
