"""A debug record of the kernel calls ring attention makes (for load-balance tests).

``with attention_trace() as t: ...`` collects ``(phase, step, Block)`` tuples in ``t.calls``,
where ``phase`` is ``"fwd"`` or ``"bwd"``. The active trace lives in a context variable.
"""
from __future__ import annotations

import contextvars
from typing import Optional

from .layout import Block

_ACTIVE: contextvars.ContextVar[Optional["AttentionTrace"]] = contextvars.ContextVar("meshpar_attn_trace", default=None)


class AttentionTrace:
    """Context manager recording the ring's kernel calls of this rank."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, Block]] = []
        self.chunk = 1

    def __enter__(self) -> "AttentionTrace":
        self._tok = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.reset(self._tok)

    def work(self, phase: str = "fwd") -> int:
        """Total work of ``phase`` in half chunk-pairs (full pair 2, diagonal pair 1)."""
        return sum(b.work(self.chunk) for p, _, b in self.calls if p == phase)


def attention_trace() -> AttentionTrace:
    """A new :class:`AttentionTrace` (use as a context manager)."""
    return AttentionTrace()


def record(phase: str, step: int, block: Block, chunk: int) -> None:
    t = _ACTIVE.get()
    if t is not None:
        t.chunk = chunk
        t.calls.append((phase, step, block))
