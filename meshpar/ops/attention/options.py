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
        balanced: the sequence blocks are in the load-balanced zigzag layout (rank ``r`` holds
            chunks ``r`` and ``2*sp-1-r`` of ``2*sp`` equal chunks, see
            :func:`~meshpar.ops.attention.layout.zigzag_permute`). Only the caller knows how the
            data was laid out, so this is off by default: with it off the blocks are contiguous
            (rank ``r`` holds chunk ``r``), which is always correct but leaves causal ring work
            unbalanced.
        block_impl: per-block kernel: ``"auto"`` (fused flash/efficient kernels on CUDA, plain
            torch elsewhere), ``"math"`` (plain torch, any dtype incl. float64), ``"cpu_fused"``
            (``aten._scaled_dot_product_flash_attention_for_cpu``), ``"flash"``, ``"cudnn"``, ``"efficient"``.
    """

    mode: Mode = "ring"
    balanced: bool = False
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
def sequence_parallel(mode: Mode | None = None, balanced: bool | None = None,
                      block_impl: BlockImpl | None = None) -> Iterator[SPOptions]:
    """Select the sequence-parallel attention variant for the block; unset arguments are inherited.

    Example::

        with sequence_parallel(mode="ring", balanced=True):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    """
    cur = _OPTIONS.get()
    new = SPOptions(mode=cur.mode if mode is None else mode,
                    balanced=cur.balanced if balanced is None else bool(balanced),
                    block_impl=cur.block_impl if block_impl is None else block_impl)
    tok = _OPTIONS.set(new)
    try:
        yield new
    finally:
        _OPTIONS.reset(tok)
