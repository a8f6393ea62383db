"""Sharded op rules, registered with the dispatcher on import.

Generic rules: pointwise, reductions, views, local contractions (matmul/einsum/linear),
blockwise softmax/layer_norm/attention. On top: multi-step matmuls (:mod:`.tp`) and
sequence-parallel attention (:mod:`.attention`).
"""
from . import pointwise, reductions, views, matmul, local_nn  # noqa: F401
from . import norms, embedding, cross_entropy, dropout  # noqa: F401  (registered after local_nn: tried first)
from . import tp, attention  # noqa: F401
from .matmul import register_matmul_algorithm

__all__ = ["register_matmul_algorithm"]
