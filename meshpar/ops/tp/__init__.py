"""Multi-step tensor-parallel matmuls: SUMMA 2D, 2.5D (Tesseract), 3D, batched.

All share one panel core (:mod:`.panels`). They are registered as candidates for ``x @ w`` and
tried, after the blockwise local plan, in priority order; the operands' specs select one.
See ``docs/matmul-algorithms.md``.

Modules:
    panels  the SUMMA/broadcast core (double-buffered async panel broadcasts, fused ring reduce)
    summa   SUMMA A·B, A·Bᵀ, Aᵀ·B and the differentiable 2D linear over local blocks
    cube    the differentiable 3D linear over local blocks
    rules   spec matching over ShardedTensors, errors, registration targets
"""
from __future__ import annotations

from ..matmul import register_matmul_algorithm
from .cube import cube_3d
from .rules import batched_matmul, cube_matmul, diagnose_matmul, summa_matmul
from .summa import summa_2d, summa_ab, summa_abt, summa_atb

register_matmul_algorithm("summa_2d", summa_matmul, priority=20)
register_matmul_algorithm("3d", cube_matmul, priority=20)
register_matmul_algorithm("batched_local", batched_matmul, priority=0)
register_matmul_algorithm("diagnose", diagnose_matmul, priority=-1000)

__all__ = ["summa_2d", "summa_ab", "summa_abt", "summa_atb", "cube_3d",
           "summa_matmul", "cube_matmul", "batched_matmul", "diagnose_matmul"]
