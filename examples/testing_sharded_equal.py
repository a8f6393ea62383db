"""meshpar.testing: check sharded code against the dense float64 computation (values and gradients).

    python examples/testing_sharded_equal.py          # starts its own 4-process gloo pool (CPU)

``assert_sharded_equal(fn, *operands)`` runs ``fn`` on ShardedTensors and on dense float64 tensors
and compares values and every gradient; ``compare_sharded`` returns the outcome instead
(pass / refuse / wrong / crash). See docs/testing.md.
"""
import torch
import torch.nn.functional as F

import meshpar as mp
from meshpar import P
from meshpar.testing import Sharded, WorkerPool, assert_sharded_equal, compare_sharded


def check(mesh):
    g = torch.Generator().manual_seed(0)
    A, B, W = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((4, 6), (4, 6), (6, 3)))
    # a split operand, a replicated one, a Python scalar
    assert_sharded_equal(lambda a, b, c: torch.tanh(a) * b + c, Sharded(A, P("x", "y")), Sharded(B, P()), 2.5,
                         mesh=mesh)
    # a row-parallel matmul, then a bias and an activation, against dense
    assert_sharded_equal(lambda a, w: F.gelu(a @ w + 1), Sharded(A, P(None, "y")), Sharded(W, P("y")), mesh=mesh)
    # a module: parameter gradients are compared too (every rank must build the same module: seed first)
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 3)
    assert_sharded_equal(lin, Sharded(A, P("x", "y")), mesh=mesh, param_specs={"weight": P(None, "y"), "bias": P()})
    # the outcome of something meshpar may refuse, without raising
    out = compare_sharded(lambda a: torch.cumsum(a, 0), (Sharded(A, P("x")),), mesh=mesh)
    return out.status


if __name__ == "__main__":
    pool = WorkerPool(world_size=4)
    try:
        print("cumsum along a split dim:", pool.run(check, (2, 2), ("x", "y"))[0])
        print("all checks passed")
    finally:
        pool.close()
