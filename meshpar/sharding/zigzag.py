"""The zigzag (head-tail) layout of one dimension: index math and the two layout changes.

A dimension of size ``S`` split ``n`` ways over ``Zigzag(a)`` is cut into ``2n`` chunks of
``c = S / 2n``; rank ``r`` (its index along ``a``) holds chunks ``r`` and ``2n-1-r``. Gathering
the local blocks in rank order gives the *storage order* ``[0, 2n-1, 1, 2n-2, ...]`` of chunks;
:func:`to_natural` undoes it. For ``n = 1`` the layout is the identity.

* :func:`zigzag_slice`: replicated -> zigzag along a dim (free, local); backward all-gathers.
* :func:`zigzag_gather`: zigzag -> replicated along a dim (one all-gather, then a local reorder).
* :func:`zigzag_reduce_scatter`, :func:`zigzag_all_to_all`: the other two reshard steps.
"""
from __future__ import annotations

import torch

from ..mesh import Mesh, collectives as C
from ..mesh import autograd as MA


def chunk_ids(r: int, n: int) -> tuple[int, int]:
    """The two chunks (of ``2n``) rank ``r`` holds, in local order."""
    return r, 2 * n - 1 - r


def storage_index(size: int, n: int, device=None) -> torch.Tensor:
    """``idx`` with ``storage = natural.index_select(dim, idx)`` (the rank blocks, concatenated)."""
    c = size // (2 * n)
    order = torch.tensor([k for r in range(n) for k in chunk_ids(r, n)], device=device)
    return (order.view(-1, 1) * c + torch.arange(c, device=device).view(1, -1)).reshape(-1)


def natural_index(size: int, n: int, device=None) -> torch.Tensor:
    """The inverse of :func:`storage_index`: ``natural = storage.index_select(dim, idx)``."""
    idx = storage_index(size, n, device)
    inv = torch.empty_like(idx)
    inv[idx] = torch.arange(size, device=device)
    return inv


def local_positions(size: int, n: int, r: int, device=None) -> torch.Tensor:
    """Global positions (int64) of rank ``r``'s ``size / n`` local rows."""
    c = size // (2 * n)
    a, b = chunk_ids(r, n)
    return torch.cat([torch.arange(a * c, (a + 1) * c, device=device), torch.arange(b * c, (b + 1) * c, device=device)])


def to_storage(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """Natural -> storage order along ``dim`` (differentiable; identity for ``n == 1``)."""
    if n == 1:
        return x
    return x.index_select(dim, storage_index(x.shape[dim], n, x.device))


def to_natural(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """Storage -> natural order along ``dim`` (differentiable; identity for ``n == 1``)."""
    if n == 1:
        return x
    return x.index_select(dim, natural_index(x.shape[dim], n, x.device))


def take_local(x: torch.Tensor, n: int, r: int, dim: int) -> torch.Tensor:
    """Rank ``r``'s block of the (natural-order) ``x`` along ``dim``: chunks ``r`` and ``2n-1-r``."""
    if n == 1:
        return x
    c = x.shape[dim] // (2 * n)
    a, b = chunk_ids(r, n)
    return torch.cat([x.narrow(dim, a * c, c), x.narrow(dim, b * c, c)], dim=dim)


class _ZigzagSlice(torch.autograd.Function):
    """Keep this rank's zigzag block of ``dim`` (free); backward all-gathers and reorders the gradient."""

    @staticmethod
    def forward(ctx, x, mesh, axes, dim):
        ctx.mesh, ctx.axes, ctx.dim = mesh, axes, dim
        return take_local(x, mesh.size(axes), mesh.axis_index(axes), dim)

    @staticmethod
    def backward(ctx, g):
        full = C.all_gather(g.contiguous(), ctx.mesh, ctx.axes, ctx.dim)
        return to_natural(full, ctx.mesh.size(ctx.axes), ctx.dim), None, None, None


def zigzag_slice(x: torch.Tensor, mesh: Mesh, axes: tuple[str, ...], dim: int) -> torch.Tensor:
    """Replicated -> zigzag over ``axes`` on ``dim``: a free local copy (autograd-aware)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _ZigzagSlice.apply(x, mesh, tuple(axes), dim)
    return take_local(x, mesh.size(axes), mesh.axis_index(axes), dim)


def zigzag_gather(x: torch.Tensor, mesh: Mesh, axes: tuple[str, ...], dim: int, differentiable: bool) -> torch.Tensor:
    """Zigzag over ``axes`` on ``dim`` -> whole, in natural order: one all-gather of ``(n-1)·b`` bytes."""
    g = MA.all_gather(x, mesh, axes, dim) if differentiable else C.all_gather(x, mesh, axes, dim)
    return to_natural(g, mesh.size(axes), dim)


def zigzag_reduce_scatter(x: torch.Tensor, mesh: Mesh, axes: tuple[str, ...], dim: int,
                          differentiable: bool) -> torch.Tensor:
    """Sum partial values over ``axes`` into a zigzag split of ``dim`` (one reduce-scatter, ``(n-1)/n·b``)."""
    x = to_storage(x, mesh.size(axes), dim)
    return MA.psum_scatter(x, mesh, axes, dim) if differentiable else C.reduce_scatter(x.contiguous(), mesh, axes, dim)


def zigzag_all_to_all(x: torch.Tensor, mesh: Mesh, axes: tuple[str, ...], split_dim: int, concat_dim: int,
                      differentiable: bool) -> torch.Tensor:
    """Move a zigzag split from ``concat_dim`` to ``split_dim`` with one all-to-all (``(n-1)/n·b``).

    ``split_dim`` is put in storage order first (so chunk ``j`` is rank ``j``'s zigzag block) and
    the gathered ``concat_dim`` (in storage order after the exchange) back to natural order.
    """
    n = mesh.size(axes)
    x = to_storage(x, n, split_dim)
    x = (MA.all_to_all(x, mesh, axes, split_dim, concat_dim) if differentiable
         else C.all_to_all(x, mesh, axes, split_dim, concat_dim))
    return to_natural(x, n, concat_dim)
