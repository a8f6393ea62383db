"""SUMMA 2D (Optimus) on a q×q grid of mesh axes ``(row, col)``, over local blocks.

Block notation: rank ``(i, j)`` (``i`` = coordinate on ``row``, ``j`` on ``col``) holds block
``(i, j)`` of each 2-D operand, i.e. its rows are split over ``row`` and its columns over ``col``.

=========  ==============================  ==========================================  ================
form       operands (global)               step s on rank (i, j)                       combine
=========  ==============================  ==========================================  ================
A·B        A[M,K], B[K,N] -> C[M,N]        A_is along col, B_sj along row, A_is·B_sj    accumulate
A·Bᵀ       A[M,N], B[K,N] -> C[M,K]        d=(j-s-1)%q; B_dj along row; A_ij·B_djᵀ      ring over col
Aᵀ·B       A[M,K], B[M,N] -> C[K,N]        d=(i-s-1)%q; A_id along col; A_idᵀ·B_ij      ring over row
=========  ==============================  ==========================================  ================

Communication per rank and call: ``A·B`` receives ``(q-1)`` blocks of A and ``(q-1)`` of B; ``A·Bᵀ``
receives ``(q-1)`` blocks of B and ``(q-1)`` blocks of C; ``Aᵀ·B`` ``(q-1)`` blocks of A and of C.
Memory: two panel buffers per streamed operand plus the output (ring forms: two output blocks).

The linear layer ``Y = X·W`` with ``X[..., K]`` (leading dims flattened to rows) uses
``A·B`` forward, ``A·Bᵀ`` for ``dX = dY·Wᵀ`` and ``Aᵀ·B`` for ``dW = Xᵀ·dY``.
"""
from __future__ import annotations

import torch

from ...mesh import Mesh
from .panels import Stream, panel_loop, ring_dest


def _check_grid(mesh: Mesh, row: str, col: str) -> int:
    q = mesh.size(row)
    if mesh.size(col) != q:
        from ...errors import ShardingError
        raise ShardingError(f"SUMMA needs a square grid, but mesh axis {row!r} has {q} ranks and {col!r} "
                            f"has {mesh.size(col)}; make the two axes the same size")
    return q


def summa_ab(a: torch.Tensor, b: torch.Tensor, mesh: Mesh, row: str, col: str) -> torch.Tensor:
    """C = A·B. ``a``: block [M/q, K/q] of A; ``b``: block [K/q, N/q] of B; returns block [M/q, N/q] of C."""
    q = _check_grid(mesh, row, col)

    def product(t, panels, acc):
        pa, pb = panels
        return torch.mm(pa, pb) if acc is None else acc.addmm_(pa, pb)

    return panel_loop(mesh, q, [Stream(a, col), Stream(b, row)], lambda t: t, product)


def summa_abt(a: torch.Tensor, b: torch.Tensor, mesh: Mesh, row: str, col: str) -> torch.Tensor:
    """C = A·Bᵀ. ``a``: block [M/q, N/q] of A; ``b``: block [K/q, N/q] of B; returns block [M/q, K/q] of C."""
    q = _check_grid(mesh, row, col)
    return panel_loop(mesh, q, [Stream(b, row)], lambda s: ring_dest(mesh, col, s),
                      lambda s, panels, _: torch.mm(a, panels[0].t()), ring_axis=col)


def summa_atb(a: torch.Tensor, b: torch.Tensor, mesh: Mesh, row: str, col: str) -> torch.Tensor:
    """C = Aᵀ·B. ``a``: block [M/q, K/q] of A; ``b``: block [M/q, N/q] of B; returns block [K/q, N/q] of C."""
    q = _check_grid(mesh, row, col)
    return panel_loop(mesh, q, [Stream(a, col)], lambda s: ring_dest(mesh, row, s),
                      lambda s, panels, _: torch.mm(panels[0].t(), b), ring_axis=row)


class _Summa2D(torch.autograd.Function):
    """Y = X·W on local blocks: x [..., K/q] (rows over ``row``), w [K/q, N/q] -> y [..., N/q]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, mesh: Mesh, row: str, col: str) -> torch.Tensor:
        ctx.mesh, ctx.row, ctx.col = mesh, row, col
        ctx.save_for_backward(x, w)
        a = x.reshape(-1, x.shape[-1])
        y = summa_ab(a, w.contiguous(), mesh, row, col)
        return y.view(*x.shape[:-1], w.shape[-1])

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        x, w = ctx.saved_tensors
        mesh, row, col = ctx.mesh, ctx.row, ctx.col
        g = gy.reshape(-1, gy.shape[-1]).contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = summa_abt(g, w.contiguous(), mesh, row, col).view(x.shape)
        if ctx.needs_input_grad[1]:
            dw = summa_atb(x.reshape(-1, x.shape[-1]).contiguous(), g, mesh, row, col)
        return dx, dw, None, None, None


def summa_2d(x_local: torch.Tensor, w_local: torch.Tensor, mesh: Mesh, row: str = "x", col: str = "y") -> torch.Tensor:
    """Differentiable SUMMA 2D over local blocks.

    Global: X[..., K] with its rows (the flattened leading dims) split over ``row`` and K over
    ``col``, e.g. spec ``P("x", None, "y")``; W[K, N] with spec ``P("x", "y")``. Returns the local
    block [..., N/q] of Y = X·W, spec ``P("x", None, "y")``. The leading dims may be split over
    further mesh axes (2.5D depth, data): those ranks run independent SUMMAs, and the caller sums
    W's gradient over those axes (``pvary`` / ``enter(w, vary=...)``).
    """
    _check_grid(mesh, row, col)
    return _Summa2D.apply(x_local, w_local, mesh, row, col)
