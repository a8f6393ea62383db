"""3D tensor parallelism over three mesh axes ``(a, b, c)`` (the design table's ``(i, j, k)``), local blocks.

Specs (``B`` = the batch-like dim that carries the split, ``pre`` = optional outer axes such as ``data``)::

    X [.., B, .., K]  P(.., (pre.., a, b), .., c)
    W [K, N]          P(c, (b, a))
    Y [.., B, .., N]  P(.., (pre.., a, c), .., b)

Forward: X's blocks are streamed over ``b`` through the SUMMA panel core (a broadcast per member of
``b``, overlapped with the local products; together an all-gather over ``b``), W is all-gathered over
``a`` (concurrently), each panel is multiplied locally, and the partial result (summed over ``c``) is
reduce-scattered over ``c`` along B. The output's hidden dim is split over ``b``, so the next layer's
weight is ``P(b, (c, a))`` and maps Y back to X's layout: the roles of the axes follow from the specs.

Backward (nothing but the local blocks is saved): dY's blocks are streamed over ``c`` while W is
re-gathered over ``a``; ``dX = dY_g·W_gᵀ`` is reduce-scattered over ``b``; X's blocks are streamed over
``b`` again and ``dW = X_gᵀ·dY_g`` is reduce-scattered over ``a`` along N.

Sizes of ``a``, ``b``, ``c`` need not be equal.
"""
from __future__ import annotations

import torch

from ...mesh import Mesh
from ...mesh import collectives as C
from .panels import Stream, panel_loop


def _gathered_rows(x: torch.Tensor, mesh: Mesh, axis: str, dim: int, fn) -> torch.Tensor:
    """Stream ``x``'s blocks over ``axis`` (dim ``dim`` grows by the axis size) and return the
    concatenation along ``dim`` of ``fn(t, panel)`` for each member ``t``."""
    n = mesh.size(axis)
    rows = x.shape[dim]
    def product(t, panels, acc):
        r = fn(t, panels[0])
        if acc is None:
            shape = list(r.shape)
            shape[dim] = rows * n
            acc = torch.empty(shape, dtype=r.dtype, device=r.device)
        acc.narrow(dim, t * rows, rows).copy_(r)
        return acc

    return panel_loop(mesh, n, [Stream(x.contiguous(), axis)], lambda t: t, product)


def cube_forward(x: torch.Tensor, w: torch.Tensor, mesh: Mesh, a: str, b: str, c: str, dim: int) -> torch.Tensor:
    """Local block of Y = X·W (no autograd). ``x``: [.., B/(pre·|a||b|), .., K/|c|]; ``w``: [K/|c|, N/(|a||b|)]."""
    wg_pending = C.all_gather(w.contiguous(), mesh, a, dim=1, async_op=True)
    wg: list[torch.Tensor] = []

    def rows(t, panel):
        if not wg:
            wg.append(wg_pending.wait())
        return torch.matmul(panel, wg[0])

    part = _gathered_rows(x, mesh, b, dim, rows)
    return C.reduce_scatter(part, mesh, c, dim=dim)


class _Cube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, mesh: Mesh, a: str, b: str, c: str, dim: int):
        ctx.args = (mesh, a, b, c, dim)
        ctx.save_for_backward(x, w)
        return cube_forward(x, w, mesh, a, b, c, dim)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        mesh, a, b, c, dim = ctx.args
        need_dx, need_dw = ctx.needs_input_grad[:2]
        wg_pending = C.all_gather(w.contiguous(), mesh, a, dim=1, async_op=True) if need_dx else None
        wg: list[torch.Tensor] = []
        nb = mesh.size(b)
        xrows = x.shape[dim]
        dx_parts: list[torch.Tensor] = []

        def dx_rows(t, panel):
            # panel: dY block of member t along c; keep it (dY_g) and, if needed, form its dX rows
            if need_dx:
                if not wg:
                    wg.append(wg_pending.wait())
                dx_parts.append(torch.matmul(panel, wg[0].t()))
            return panel

        gy_g = _gathered_rows(gy.contiguous(), mesh, c, dim, dx_rows)
        dx_pending = None
        if need_dx:
            dx_pending = C.reduce_scatter(torch.cat(dx_parts, dim=dim), mesh, b, dim=dim, async_op=True)
        dw = None
        if need_dw:
            n_out = gy.shape[-1]

            def dw_product(t, panels, acc):
                xp = panels[0].reshape(-1, panels[0].shape[-1])
                gp = gy_g.narrow(dim, t * xrows, xrows).reshape(-1, n_out)
                return torch.mm(xp.t(), gp) if acc is None else acc.addmm_(xp.t(), gp)

            part = panel_loop(mesh, nb, [Stream(x.contiguous(), b)], lambda t: t, dw_product)
            dw = C.reduce_scatter(part, mesh, a, dim=1)
        dx = dx_pending.wait() if dx_pending is not None else None
        return dx, dw, None, None, None, None, None


def cube_3d(x_local: torch.Tensor, w_local: torch.Tensor, mesh: Mesh, a: str = "i", b: str = "j", c: str = "k",
            dim: int = 0) -> torch.Tensor:
    """Differentiable 3D matmul over local blocks.

    ``x_local``: block of X with spec ``P(.., (pre.., a, b), .., c)`` whose split batch dim is ``dim``;
    ``w_local``: block of W with spec ``P(c, (b, a))``. Returns the block of Y with spec
    ``P(.., (pre.., a, c), .., b)``. The caller sums W's gradient over ``pre`` and any other axis
    that splits X's leading dims.
    """
    return _Cube.apply(x_local, w_local, mesh, a, b, c, dim % x_local.ndim)
