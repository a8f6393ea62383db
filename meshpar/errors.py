"""Exceptions raised by meshpar.

Every layout problem is reported as a :class:`ShardingError` *before* any collective is
issued, so a bad spec never turns into a hang.
"""
from __future__ import annotations


class ShardingError(ValueError):
    """A spec, mesh or shape does not fit. The message names the dimension, the axis and the fix."""


class CollectiveTimeout(RuntimeError):
    """A collective did not finish in time. The message names the op and the mesh axis."""
