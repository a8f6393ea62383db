"""Options of sequence-parallel attention, held in a context variable (no module state).

``with sequence_parallel(mode="all_to_all"):`` changes how a ``scaled_dot_product_attention``
call over sequence-sharded ShardedTensors (and :func:`~meshpar.ops.attention.api.sp_attention`
without explicit arguments) is computed inside the block. Options nest; the innermost wins.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Iterator, Literal

Mode = Literal["ring", "all_to_all"]
BlockImpl = Literal["auto", "math", "cpu_fused", "flash", "cudnn", "efficient"]

_MODES = ("ring", "all_to_all")
_IMPLS = ("auto", "math", "cpu_fused", "flash", "cudnn", "efficient")


@dataclasses.dataclass(frozen=True)
class SPOptions:
    """How sequence-parallel attention runs.

    Attributes:
        mode: ``"ring"`` (K/V blocks travel around the ring; memory O(S/sp)) or ``"all_to_all"``
            (Ulysses: reshard sequence -> heads, full-sequence local attention, reshard back;
            needs ``heads % sp == 0``).
        block_impl: per-block kernel: ``"auto"`` (fused flash/efficient kernels on CUDA, plain
            torch elsewhere), ``"math"`` (plain torch, any dtype incl. float64), ``"cpu_fused"``
            (``aten._scaled_dot_product_flash_attention_for_cpu``), ``"flash"``, ``"cudnn"``, ``"efficient"``.
    """

    mode: Mode = "ring"
    block_impl: BlockImpl = "auto"

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"sequence_parallel mode must be one of {_MODES}, got {self.mode!r}")
        if self.block_impl not in _IMPLS:
            raise ValueError(f"sequence_parallel block_impl must be one of {_IMPLS}, got {self.block_impl!r}")


_OPTIONS: contextvars.ContextVar[SPOptions] = contextvars.ContextVar("meshpar_sp_options", default=SPOptions())


def current_options() -> SPOptions:
    """The options in effect (innermost :func:`sequence_parallel` block, else the defaults)."""
    return _OPTIONS.get()


@contextlib.contextmanager
def sequence_parallel(mode: Mode | None = None, block_impl: BlockImpl | None = None, *,
                      balanced: None = None) -> Iterator[SPOptions]:
    """Select the sequence-parallel attention variant for the block; unset arguments are inherited.

    The sequence layout is not an option: it is the spec's (``P(None, None, Zigzag("sp"), None)``
    for the load-balanced causal layout, ``P(None, None, "sp", None)`` for contiguous blocks).

    Example::

        with sequence_parallel(mode="all_to_all"):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    """
    if balanced is not None:
        raise TypeError("sequence_parallel(balanced=...) is gone: the balanced layout is part of the spec now. "
                        "Shard q/k/v with P(None, None, meshpar.Zigzag('sp'), None) (shard/unshard permute "
                        "transparently)")
    cur = _OPTIONS.get()
    new = SPOptions(mode=cur.mode if mode is None else mode,
                    block_impl=cur.block_impl if block_impl is None else block_impl)
    tok = _OPTIONS.set(new)
    try:
        yield new
    finally:
        _OPTIONS.reset(tok)
