"""The one place that decides partial-sum semantics, plus the two switches on implicit behaviour.

**Linearity table.** A value that is *unreduced* over axes ``U`` (a partial sum: the value is
the sum of the ranks' blocks over ``U``) may pass through an op without being summed only when
the op is linear in it:

* ``"add"`` ops (``a + b``, ``a - b``): every *value* operand must be a partial sum over the
  same ``U``. A Python scalar, a plain tensor or a replicated tensor is a value that would be
  counted once per rank, so it forces the reduction first.
* ``"scale"`` ops (``a * c``, ``a / c``): exactly one operand is partial; the others are
  scalars, plain tensors or ShardedTensors that are neither partial nor split over ``U``
  (a factor split over ``U`` would multiply each partial by a different block). For a division
  the partial operand must be the numerator.
* ``"linear"`` ops (``-a``, ``clone``, float->float casts, views): one value operand.
* anything else (``"no"``): non-linear; partial operands are summed first.

Integer and bool casts are not linear (each partial would be truncated on its own), nor are casts
to a lower precision (each partial would be rounded on its own): see :func:`float_cast`. A division
with ``rounding_mode`` ("floor"/"trunc") is not linear either.

**strict().** By default an op that needs a reshard gets the cheapest one inserted. Inside
``with meshpar.strict():`` every implicit collective raises a :class:`ShardingError` naming the
op and the reshard instead (explicit ``reshard``/``unshard`` still communicate).

**debug_checks().** Inside ``with meshpar.debug_checks():`` (or with ``MESHPAR_DEBUG=1`` in the
environment) ``shard`` and ``from_local`` check, with one small all-reduce, that ranks agree
on blocks that the spec says are replicated.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator, Sequence

import torch

from ..errors import ShardingError
from .spec import P

_STRICT: contextvars.ContextVar[bool] = contextvars.ContextVar("meshpar_strict", default=False)
_DEBUG: contextvars.ContextVar[bool | None] = contextvars.ContextVar("meshpar_debug", default=None)
# the torch callable the user called (set by the __torch_function__ handler), for messages
USER_OP: contextvars.ContextVar = contextvars.ContextVar("meshpar_user_op", default=None)


def user_name(func) -> str:
    """The op as the user wrote it: ``torch.cumsum``, ``Tensor.add_``, ``F.pad``."""
    if func is None or isinstance(func, str):
        return func
    name = getattr(func, "__name__", None) or repr(func)
    mod = getattr(func, "__module__", None) or ""
    qual = getattr(func, "__qualname__", "") or ""
    if mod.startswith("torch.nn.functional"):
        return f"F.{name}"
    if qual.startswith(("Tensor.", "TensorBase.", "_TensorBase.")) or "Tensor" in qual.split(".")[0]:
        return f"Tensor.{name}"
    if mod == "torch" or mod.startswith("torch._C") or mod.startswith("torch.functional"):
        return f"torch.{name}"
    return name


@contextlib.contextmanager
def strict(on: bool = True) -> Iterator[None]:
    """Refuse every implicit collective (a reshard an op would insert) inside the block."""
    tok = _STRICT.set(bool(on))
    try:
        yield
    finally:
        _STRICT.reset(tok)


def is_strict() -> bool:
    return _STRICT.get()


@contextlib.contextmanager
def debug_checks(on: bool = True) -> Iterator[None]:
    """Check replication claims in ``shard``/``from_local`` inside the block (one checksum all-reduce each)."""
    tok = _DEBUG.set(bool(on))
    try:
        yield
    finally:
        _DEBUG.reset(tok)


def debug_enabled() -> bool:
    v = _DEBUG.get()
    if v is None:
        return os.environ.get("MESHPAR_DEBUG", "") not in ("", "0")
    return v


def op_label(fallback: str) -> str:
    """The op as the user wrote it (with the aten op when different), for messages."""
    user = user_name(USER_OP.get())
    if user and user != fallback:
        return f"{user} ({fallback})"
    return user or fallback


def implicit(op: str, what: str, mesh=None) -> None:
    """Called before an implicit collective: raise in strict mode, else do nothing."""
    if _STRICT.get():
        axes = f" (mesh axes {mesh.names})" if mesh is not None else ""
        raise ShardingError(
            f"{op_label(op)} needs an implicit reshard: {what}{axes}, and meshpar.strict() is on. Reshard the "
            "operands yourself (meshpar.reshard(x, spec)) to the layout the op runs locally on, or leave strict mode")


# ---------------------------------------------------------------------------- linearity
# operand descriptors: ("S", spec, shape) ShardedTensor, ("T", shape) plain tensor, ("N",) Python number
Desc = tuple


def keep_partial(kind: str, operands: Sequence[Desc], partial_first_only: bool = False) -> tuple[str, ...] | None:
    """The unreduced axes an op of linearity ``kind`` may keep, or None when it must reduce first.

    ``operands``: the op's *value* operands (tensors and numbers that enter the result; not
    dtypes, dims or multipliers like ``alpha``). Returns ``()`` when no operand is partial.
    ``partial_first_only``: the op is linear only in its first operand (division).
    """
    unreds = [d[1].unreduced for d in operands if d[0] == "S" and d[1].unreduced]
    if not unreds:
        return ()
    u = unreds[0]
    if kind in ("add", "linear"):
        if kind == "linear" and len(operands) != 1:
            return None
        if all(d[0] == "S" and d[1].unreduced == u for d in operands):
            return u
        return None
    if kind == "scale":
        if len(unreds) != 1:
            return None
        us = set(u)
        for i, d in enumerate(operands):
            if d[0] == "S" and d[1].unreduced:
                if partial_first_only and i != 0:
                    return None
                continue
            if d[0] == "S" and us & set(d[1].sharded_axes()):
                return None
        return u
    return None


def float_cast(dtype: torch.dtype | None, src: torch.dtype | None = None) -> bool:
    """True when a cast of a ``src`` tensor to ``dtype`` is linear and exact, so a partial sum may
    be cast share by share (None = unchanged dtype).

    Only floating/complex casts that lose no precision or range qualify: a cast to a lower
    precision (``.half()``, ``.bfloat16()``, float64 -> float32) rounds each share on its own,
    which differs from rounding the sum, so the partial sum is reduced first. Integer and bool
    casts truncate each share and never qualify. ``src=None`` (unknown source) only accepts ``None``.
    """
    if dtype is None or dtype == src:
        return True
    if src is None or not (dtype.is_floating_point or dtype.is_complex):
        return False
    if not (src.is_floating_point or src.is_complex):
        return False
    if src.is_complex and not dtype.is_complex:
        return False
    fs, fd = torch.finfo(src), torch.finfo(dtype)
    return fd.eps <= fs.eps and fd.max >= fs.max and fd.tiny <= fs.tiny


def desc(x) -> Desc | None:
    """The operand descriptor of ``x`` (None when ``x`` is not a value operand)."""
    from .tensor import ShardedTensor
    if isinstance(x, ShardedTensor):
        return ("S", x.spec, tuple(x._gshape))
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape))
    if isinstance(x, (bool, int, float, complex)):
        return ("N",)
    return None


def check_output(local: torch.Tensor, spec: P, mesh, shape: Sequence[int]) -> None:
    """Validate a result's spec against its global shape and its block's shape (cached; always on)."""
    key = (spec, tuple(shape))
    table = getattr(mesh, "_checked", None)
    if table is None:
        try:
            mesh._checked = table = {}
        except AttributeError:
            table = {}
    loc = table.get(key)
    if loc is None:
        from .layout import local_shape, validate
        validate(shape, spec, mesh, "op result")
        loc = tuple(local_shape(shape, spec, mesh))
        if len(table) < 65536:
            table[key] = loc
    if tuple(local.shape) != loc:
        raise ShardingError(f"{op_label('op')}: internal layout error: result block of shape {tuple(local.shape)} "
                            f"is not the block {loc} of global shape {tuple(shape)} under {spec}")
