"""Where chunks can live: an accelerator with a byte budget, and the host.

Two implementations of one small interface:

* :class:`SimulatedDevice`: a fake accelerator that is plain CPU memory with a byte capacity.
  Chunks "on device" count against the capacity; copies are synchronous. The manager's whole
  logic (states, eviction, prefetch, hybrid optimizer placement) runs on it, so CI tests it on CPU.
* :class:`CudaDevice`: a CUDA GPU. Host buffers are pinned; uploads and downloads run on a side
  stream (``copy_stream``) and return events, so copies overlap compute on the main stream.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, ContextManager

import torch

log = logging.getLogger("meshpar.memory")


class Event:
    """A finished-or-not marker for an asynchronous copy (already done on the simulated device)."""

    def __init__(self, cuda_event: Any = None):
        self._ev = cuda_event

    def wait_host(self) -> None:
        """Block the calling CPU thread until the copy finished (host reads after a download)."""
        if self._ev is not None:
            self._ev.synchronize()

    def wait_stream(self) -> None:
        """Make the current stream wait for the copy (device reads after an upload)."""
        if self._ev is not None:
            torch.cuda.current_stream().wait_event(self._ev)


class SimulatedDevice:
    """A fake accelerator: CPU memory with ``capacity`` bytes for chunks.

    Args:
        capacity: bytes of chunk payload (parameter and optimizer-state chunks) that may be "on
            device" at once. Non-model memory is reported as ``nonmodel`` (default 0 bytes).
    """

    simulated = True

    def __init__(self, capacity: int, nonmodel: int = 0):
        self.capacity = int(capacity)
        self.nonmodel = int(nonmodel)
        self.device = torch.device("cpu")
        self.uploads = 0      # counters for tests and reports
        self.downloads = 0

    def empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(numel, dtype=dtype)

    def host_empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(numel, dtype=dtype)

    def upload(self, dst: torch.Tensor, src: torch.Tensor, after: Event | None = None) -> Event:
        self.uploads += 1
        dst.copy_(src)
        return Event()

    def download(self, dst: torch.Tensor, src: torch.Tensor) -> Event:
        self.downloads += 1
        dst.copy_(src)
        return Event()

    def nonmodel_bytes(self, model_bytes_on_device: int) -> int:
        """Bytes on the device that are not chunks (activations, temporaries)."""
        return self.nonmodel

    def copy_stream(self) -> ContextManager[Any]:
        return contextlib.nullcontext()

    def synchronize(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"SimulatedDevice(capacity={self.capacity})"


class CudaDevice:
    """A CUDA GPU with a side copy stream and pinned host buffers.

    Args:
        device: the CUDA device (default the current one).
        capacity: bytes the manager may use for chunks plus non-model memory (default the card's
            total memory less ``reserve``).
        reserve: bytes left to the CUDA context, cuBLAS workspaces and fragmentation.
        track_nonmodel: measure non-model memory (False: count only chunks against ``capacity``,
            as the simulated device does; for checks that force chunk movement on a real GPU).
    """

    simulated = False

    def __init__(self, device: torch.device | str | int | None = None, capacity: int | None = None,
                 reserve: int = 3 << 30, track_nonmodel: bool = True):
        self.device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        total = torch.cuda.get_device_properties(self.device).total_memory
        self.capacity = int(capacity) if capacity is not None else int(total - reserve)
        self._up = torch.cuda.Stream(self.device)      # host -> device
        self._down = torch.cuda.Stream(self.device)    # device -> host (PCIe is full duplex)
        self.track_nonmodel = track_nonmodel
        self.nonmodel = 0
        if "expandable_segments:true" not in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "").replace(" ", "").lower():
            log.info("offload on CUDA: set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True before the first CUDA "
                     "allocation; chunks moving between activations fragment the caching allocator otherwise "
                     "(an out-of-memory error with GiBs 'reserved but unallocated')")
        self.uploads = 0
        self.downloads = 0

    def empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(numel, dtype=dtype, device=self.device)

    def host_empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(numel, dtype=dtype, pin_memory=True)

    def upload(self, dst: torch.Tensor, src: torch.Tensor, after: Event | None = None) -> Event:
        """``dst`` (device, allocated on the main stream) <- ``src`` (pinned host), on the upload stream,
        after the download ``after`` that filled ``src`` (if any)."""
        self.uploads += 1
        s = self._up
        s.wait_stream(torch.cuda.current_stream(self.device))
        if after is not None and after._ev is not None:
            s.wait_event(after._ev)
        with torch.cuda.stream(s):
            dst.copy_(src, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(s)
        dst.record_stream(s)
        return Event(ev)

    def download(self, dst: torch.Tensor, src: torch.Tensor) -> Event:
        """``dst`` (pinned host) <- ``src`` (device), after the main stream's pending work on ``src``."""
        self.downloads += 1
        s = self._down
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            dst.copy_(src, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(s)
        src.record_stream(s)   # the caller may drop src now: the allocator waits for the copy
        return Event(ev)

    def nonmodel_bytes(self, model_bytes_on_device: int) -> int:
        """Peak non-chunk bytes since the last call (op-boundary value and the peak between boundaries)."""
        if not self.track_nonmodel:
            return 0
        peak = max(torch.cuda.memory_allocated(self.device), torch.cuda.max_memory_allocated(self.device))
        torch.cuda.reset_peak_memory_stats(self.device)
        return max(0, peak - model_bytes_on_device)

    def copy_stream(self) -> ContextManager[Any]:
        return torch.cuda.stream(self._up)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def __repr__(self) -> str:
        return f"CudaDevice({self.device}, capacity={self.capacity / 2**30:.1f} GiB)"


def host_available_bytes() -> int:
    """Bytes the host can still give (``MemAvailable`` of ``/proc/meminfo``; a large number if unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62
