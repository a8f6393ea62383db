"""``P``: a partition spec, one entry per tensor dimension (JAX semantics).

Each entry is ``None`` (replicated), an axis name, or a tuple of axis names (the dimension is
split over their product, major to minor). Axes not mentioned are replicated. Trailing ``None``
may be left out. ``unreduced=`` names axes over which the value is a partial sum still to be
added up (JAX ``unreduced``; DTensor ``Partial``).

>>> P("x", None, ("y", "z"))
P('x', None, ('y', 'z'))
"""
from __future__ import annotations

from typing import Iterable, Iterator, Union

Entry = Union[None, str, tuple]


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
    return t


class P:
    """An immutable, hashable partition spec."""

    __slots__ = ("entries", "unreduced", "_hash")

    def __init__(self, *entries: Entry, unreduced: Iterable[str] = ()):
        ents = tuple(_norm_entry(e) for e in entries)
        while ents and ents[-1] is None:
            ents = ents[:-1]
        object.__setattr__(self, "entries", ents)
        object.__setattr__(self, "unreduced", tuple(sorted(set(unreduced))))
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
        """Every axis that splits some dimension, in dimension order."""
        return tuple(a for d in range(len(self.entries)) for a in self.axes_of(d))

    def used_axes(self) -> frozenset[str]:
        """Sharded and unreduced axes: the axes over which ranks hold different values."""
        return frozenset(self.sharded_axes()) | frozenset(self.unreduced)

    def dim_of(self, axis: str) -> int | None:
        """The dimension ``axis`` splits, or None."""
        for d in range(len(self.entries)):
            if axis in self.axes_of(d):
                return d
        return None

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
