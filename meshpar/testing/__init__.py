"""Testing tools for sharded code: a gloo worker pool, dense-vs-sharded comparison, hypothesis
strategies and an OpInfo differential harness (see ``docs/testing.md``).

* :class:`WorkerPool` (:mod:`.pool`): persistent gloo processes that run small functions on a mesh.
* :func:`assert_sharded_equal` / :func:`compare_sharded` (:mod:`.compare`): run a function on sharded
  operands and on dense float64 operands; compare values, input gradients and parameter gradients.
* :mod:`meshpar.testing.strategies`: hypothesis strategies for meshes, specs of every kind
  (split, tuple axes, ``Zigzag``, replicated, partial sums) and operand mixes. Needs ``hypothesis``.
* :mod:`meshpar.testing.opinfo`: runs torch's OpInfo database against meshpar (and DTensor).
"""
from .pool import WorkerPool, WorkerError
from .compare import (Sharded, Outcome, assert_sharded_equal, compare_sharded, partial_shares, splittable,
                      classify_error)

__all__ = ["WorkerPool", "WorkerError", "Sharded", "Outcome", "assert_sharded_equal", "compare_sharded",
           "partial_shares", "splittable", "classify_error"]
