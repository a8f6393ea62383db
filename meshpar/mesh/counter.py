"""CommCounter: a debug record of collective calls and bytes per mesh axis.

``with CommCounter() as c: ...`` records every collective issued through ``meshpar.mesh``
in the block. ``c.calls[axes]`` counts calls and ``c.bytes[axes]`` counts the bytes this rank
*receives* under the textbook algorithm of each collective (the quantity algorithm formulas use):

============== =====================================================
collective      bytes received per rank (n ranks on the axis, input b bytes)
============== =====================================================
all_gather      (n-1) * b            (b = local chunk)
reduce_scatter  (n-1)/n * b          (b = full input)
all_reduce      2 (n-1)/n * b        (ring: reduce-scatter + all-gather)
all_to_all      (n-1)/n * b
broadcast       b on non-source ranks, 0 on the source
ppermute/send   b on a receiving rank
============== =====================================================

Counters nest; the active ones live in a context variable, not in module state.
"""
from __future__ import annotations

import contextvars
from collections import defaultdict

_ACTIVE: contextvars.ContextVar[tuple["CommCounter", ...]] = contextvars.ContextVar("meshpar_comm_counters", default=())


class CommCounter:
    """Context manager recording ``calls`` and ``bytes`` per axis tuple and per collective kind."""

    def __init__(self) -> None:
        self.calls: dict[tuple[str, ...], int] = defaultdict(int)
        self.bytes: dict[tuple[str, ...], float] = defaultdict(float)
        self.by_kind: dict[str, int] = defaultdict(int)
        self.log: list[tuple[str, tuple[str, ...], float]] = []

    def __enter__(self) -> "CommCounter":
        self._token = _ACTIVE.set(_ACTIVE.get() + (self,))
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.reset(self._token)

    @property
    def total_bytes(self) -> float:
        return sum(self.bytes.values())

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    def __repr__(self) -> str:
        return f"CommCounter(calls={dict(self.calls)}, bytes={dict(self.bytes)})"


def record(kind: str, axes: tuple[str, ...], nbytes: float) -> None:
    """Add one call of ``kind`` over ``axes`` receiving ``nbytes`` to every active counter."""
    for c in _ACTIVE.get():
        c.calls[axes] += 1
        c.bytes[axes] += nbytes
        c.by_kind[kind] += 1
        c.log.append((kind, axes, nbytes))
