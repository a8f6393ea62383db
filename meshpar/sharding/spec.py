"""``P``: a partition spec, one entry per tensor dimension (JAX semantics).

Each entry is ``None`` (replicated), an axis name, or a tuple of axis names (the dimension is
split over their product, major to minor). Axes not mentioned are replicated. Trailing ``None``
may be left out. ``unreduced=`` names axes over which the value is a partial sum still to be
added up (JAX ``unreduced``; DTensor ``Partial``).

An entry may also be :class:`Zigzag` ``(axis)``: the dimension is split over ``axis`` in the
load-balanced zigzag (head-tail) layout instead of contiguous blocks (see :class:`Zigzag`).

>>> P("x", None, ("y", "z"))
P('x', None, ('y', 'z'))
>>> P(None, Zigzag("sp"))
P(None, Zigzag('sp'))
"""
from __future__ import annotations

from typing import Iterable, Iterator, Union

from ..errors import ShardingError

Entry = Union[None, str, tuple]


class Zigzag(str):
    """A mesh axis name tagged with the zigzag (head-tail) layout: ``P(None, Zigzag("sp"))``.

    A dimension of size ``S`` split ``n`` ways over ``Zigzag(a)`` is cut into ``2n`` equal chunks;
    the rank at index ``r`` along ``a`` holds chunks ``r`` and ``2n-1-r``, in that order (its
    local block is ``S/n`` rows, like a contiguous split). With ``n = 4``::

        chunk   0  1  2  3  4  5  6  7
        rank    0  1  2  3  3  2  1  0

    This balances causal attention (every rank does equal work); :func:`~meshpar.shard`,
    :func:`~meshpar.unshard` and :func:`~meshpar.reshard` permute transparently, so global
    tensors are always in natural order. ``S`` must be a multiple of ``2n``.

    A ``Zigzag`` is a ``str`` (mesh functions accept it as the axis name) but it is **not equal**
    to the plain name: ``Zigzag("sp") != "sp"``, so specs, rules and the reshard planner tell the
    two layouts apart and never mix them silently. ``.axis`` is the plain name. A zigzag axis
    splits its dimension alone (no tuple with other axes).
    """

    __slots__ = ()

    def __new__(cls, axis: str) -> "Zigzag":
        if isinstance(axis, Zigzag):
            return axis
        if not isinstance(axis, str) or not axis:
            raise TypeError(f"Zigzag takes one mesh axis name, got {axis!r}")
        return super().__new__(cls, axis)

    @property
    def axis(self) -> str:
        """The plain axis name."""
        return str.__str__(self)

    def __eq__(self, other) -> bool:
        return type(other) is Zigzag and str.__eq__(self, other)

    def __ne__(self, other) -> bool:
        return not self.__eq__(other)

    def __hash__(self) -> int:
        return hash(("meshpar.Zigzag", str.__str__(self)))

    def __repr__(self) -> str:
        return f"Zigzag({str.__str__(self)!r})"

    def __reduce__(self):
        return (Zigzag, (str.__str__(self),))


def base_axis(a: str) -> str:
    """The plain mesh axis name of ``a`` (a :class:`Zigzag` loses its tag)."""
    return a if type(a) is str else str.__str__(a)


def is_zigzag(axes) -> bool:
    """True when ``axes`` (an entry or a tuple of axes) is a zigzag split."""
    if isinstance(axes, tuple):
        return len(axes) == 1 and type(axes[0]) is Zigzag
    return type(axes) is Zigzag


def _norm_entry(e) -> Entry:
    if e is None or isinstance(e, str):
        return e
    t = tuple(e)
    for a in t:
        if not isinstance(a, str):
            raise TypeError(f"partition spec entries are None, an axis name or a tuple of names; got {e!r}")
    if len(t) == 0:
        return None
    if len(t) == 1:
        return t[0]
    if any(type(a) is Zigzag for a in t):
        raise ShardingError(f"a Zigzag axis splits its dimension alone; got the entry {e!r}. Use "
                            f"Zigzag(axis) on its own, or plain axis names for a contiguous split over {t}")
    return t


class P:
    """An immutable, hashable partition spec."""

    __slots__ = ("entries", "unreduced", "_hash")

    def __init__(self, *entries: Entry, unreduced: Iterable[str] = ()):
        ents = tuple(_norm_entry(e) for e in entries)
        while ents and ents[-1] is None:
            ents = ents[:-1]
        object.__setattr__(self, "entries", ents)
        object.__setattr__(self, "unreduced", tuple(sorted({base_axis(a) for a in unreduced})))
        object.__setattr__(self, "_hash", hash((ents, self.unreduced)))

    def __setattr__(self, *_):
        raise AttributeError("P is immutable")

    def __reduce__(self):
        return (_make_p, (self.entries, self.unreduced))

    # sequence protocol ----------------------------------------------------
    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries)

    def __getitem__(self, i):
        return self.entries[i]

    # value semantics --------------------------------------------------------
    def __eq__(self, other) -> bool:
        return self is other or (isinstance(other, P) and self._hash == other._hash and self.entries == other.entries
                                 and self.unreduced == other.unreduced)

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        body = ", ".join(repr(e) for e in self.entries)
        if self.unreduced:
            body += (", " if body else "") + f"unreduced={self.unreduced}"
        return f"P({body})"

    # queries ----------------------------------------------------------------
    def axes_of(self, dim: int) -> tuple[str, ...]:
        """Axes splitting ``dim`` (major to minor); ``()`` when replicated or past the end."""
        if dim >= len(self.entries):
            return ()
        e = self.entries[dim]
        if e is None:
            return ()
        return (e,) if isinstance(e, str) else tuple(e)

    def padded(self, ndim: int) -> tuple[tuple[str, ...], ...]:
        """Axes per dimension for a tensor of ``ndim`` dims."""
        return tuple(self.axes_of(d) for d in range(ndim))

    def sharded_axes(self) -> tuple[str, ...]:
        """Every mesh axis that splits some dimension, in dimension order (plain names: a
        :class:`Zigzag` axis appears as its :attr:`~Zigzag.axis`)."""
        return tuple(base_axis(a) for d in range(len(self.entries)) for a in self.axes_of(d))

    def used_axes(self) -> frozenset[str]:
        """Sharded and unreduced axes (plain names): the axes over which ranks hold different values."""
        return frozenset(self.sharded_axes()) | frozenset(self.unreduced)

    def dim_of(self, axis: str) -> int | None:
        """The dimension ``axis`` splits (zigzag or not), or None."""
        axis = base_axis(axis)
        for d in range(len(self.entries)):
            if any(base_axis(a) == axis for a in self.axes_of(d)):
                return d
        return None

    def layout_of(self, dim: int) -> str:
        """How ``dim`` is laid out: ``"replicated"``, ``"contiguous"`` (blocks in rank order) or
        ``"zigzag"`` (see :class:`Zigzag`)."""
        axes = self.axes_of(dim)
        if not axes:
            return "replicated"
        return "zigzag" if is_zigzag(axes) else "contiguous"

    def contiguous(self) -> "P":
        """The same spec with every :class:`Zigzag` axis replaced by its plain name (contiguous blocks)."""
        return P(*[tuple(base_axis(a) for a in e) if isinstance(e, tuple) else (None if e is None else base_axis(e))
                   for e in self.entries], unreduced=self.unreduced)

    def with_unreduced(self, axes: Iterable[str]) -> "P":
        return P(*self.entries, unreduced=axes)

    def reduced(self) -> "P":
        """The same spec with no unreduced axes."""
        return P(*self.entries)

    def with_entries(self, entries: Iterable[Entry]) -> "P":
        return P(*entries, unreduced=self.unreduced)

    @staticmethod
    def from_axes(per_dim: Iterable[tuple[str, ...]], unreduced: Iterable[str] = ()) -> "P":
        return P(*[tuple(a) if a else None for a in per_dim], unreduced=unreduced)


def _make_p(entries, unreduced) -> P:
    return P(*entries, unreduced=unreduced)
