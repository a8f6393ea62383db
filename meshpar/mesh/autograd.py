"""Autograd-aware collectives for code that works on local blocks (``shard_map`` bodies, op rules).

Gradient convention: **the gradient of a value has that value's layout, fully reduced.**
A value replicated over an axis has the same, complete gradient on every member of that axis.
Under this convention each collective's backward is its dual:

=================  ====================================  =====================================
function           forward                               backward
=================  ====================================  =====================================
psum               all-reduce (partial -> replicated)    identity
all_gather         all-gather (sharded -> replicated)    keep own chunk (free)
psum_scatter       reduce-scatter (partial -> sharded)   all-gather
all_to_all         all-to-all                            the inverse all-to-all
ppermute           permute                               inverse permute
pvary              identity (replicated -> used per rank) all-reduce of the gradient
all_gather_varying all-gather, result used per rank      reduce-scatter
=================  ====================================  =====================================

``pvary`` is what a replicated value needs before it feeds a computation whose result is sharded
(or partial) over the axis: each rank's gradient is then only its share, and the shares must be
summed. It is Megatron's "f" operator and JAX's ``pvary``.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import collectives as C
from .mesh import Mesh


class _PSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh, axes):
        return C.all_reduce(x, mesh, axes)

    @staticmethod
    def backward(ctx, g):
        return g, None, None


class _PVary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh, axes):
        ctx.mesh, ctx.axes = mesh, axes
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return C.all_reduce(g, ctx.mesh, ctx.axes), None, None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh, axes, dim, varying):
        ctx.mesh, ctx.axes, ctx.dim, ctx.varying = mesh, axes, dim, varying
        return C.all_gather(x, mesh, axes, dim)

    @staticmethod
    def backward(ctx, g):
        if ctx.varying:
            return C.reduce_scatter(g, ctx.mesh, ctx.axes, ctx.dim), None, None, None, None
        n = ctx.mesh.size(ctx.axes)
        return g.chunk(n, dim=ctx.dim)[ctx.mesh.axis_index(ctx.axes)].contiguous(), None, None, None, None


class _PSumScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh, axes, dim):
        ctx.mesh, ctx.axes, ctx.dim = mesh, axes, dim
        return C.reduce_scatter(x, mesh, axes, dim)

    @staticmethod
    def backward(ctx, g):
        return C.all_gather(g, ctx.mesh, ctx.axes, ctx.dim), None, None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh, axes, split_dim, concat_dim):
        ctx.args = (mesh, axes, split_dim, concat_dim)
        return C.all_to_all(x, mesh, axes, split_dim, concat_dim)

    @staticmethod
    def backward(ctx, g):
        mesh, axes, split_dim, concat_dim = ctx.args
        return C.all_to_all(g, mesh, axes, concat_dim, split_dim), None, None, None, None


class _PPermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh, axes, perm):
        ctx.args = (mesh, axes, perm)
        return C.ppermute(x, mesh, axes, perm)

    @staticmethod
    def backward(ctx, g):
        mesh, axes, perm = ctx.args
        return C.ppermute(g, mesh, axes, [(d, s) for s, d in perm]), None, None, None


def psum(x: torch.Tensor, mesh: Mesh, axes) -> torch.Tensor:
    """Sum over ``axes`` (partial -> replicated). Backward: identity."""
    return _PSum.apply(x, mesh, mesh.check_axes(axes))


def pmean(x: torch.Tensor, mesh: Mesh, axes) -> torch.Tensor:
    """Mean over ``axes``."""
    return psum(x, mesh, axes) / mesh.size(axes)


def pmax(x: torch.Tensor, mesh: Mesh, axes) -> torch.Tensor:
    """Max over ``axes``. Not differentiable (use for numerical stabilisers, e.g. softmax shifts)."""
    return C.all_reduce(x.detach(), mesh, mesh.check_axes(axes), op="max")


def pmin(x: torch.Tensor, mesh: Mesh, axes) -> torch.Tensor:
    """Min over ``axes``. Not differentiable."""
    return C.all_reduce(x.detach(), mesh, mesh.check_axes(axes), op="min")


def pvary(x: torch.Tensor, mesh: Mesh, axes) -> torch.Tensor:
    """Identity; backward sums the gradient over ``axes`` (replicated value used per rank)."""
    axes = mesh.check_axes(axes)
    if mesh.size(axes) == 1:
        return x
    return _PVary.apply(x, mesh, axes)


def all_gather(x: torch.Tensor, mesh: Mesh, axes, dim: int = 0, *, varying: bool = False) -> torch.Tensor:
    """Gather along ``dim``. Backward keeps the own chunk, or reduce-scatters when ``varying``
    (the gathered value feeds a per-rank computation, e.g. Megatron sequence parallelism)."""
    return _AllGather.apply(x, mesh, mesh.check_axes(axes), dim % x.ndim, varying)


def psum_scatter(x: torch.Tensor, mesh: Mesh, axes, dim: int = 0) -> torch.Tensor:
    """Reduce-scatter along ``dim`` (partial -> sharded). Backward: all-gather."""
    return _PSumScatter.apply(x, mesh, mesh.check_axes(axes), dim % x.ndim)


def all_to_all(x: torch.Tensor, mesh: Mesh, axes, split_dim: int, concat_dim: int) -> torch.Tensor:
    """All-to-all: split ``split_dim``, exchange, concatenate on ``concat_dim``. Backward: the inverse."""
    return _AllToAll.apply(x, mesh, mesh.check_axes(axes), split_dim % x.ndim, concat_dim % x.ndim)


def ppermute(x: torch.Tensor, mesh: Mesh, axis, perm: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Permute along ``axis`` by ``(src, dst)`` pairs. Backward: the inverse permutation."""
    return _PPermute.apply(x, mesh, mesh.check_axes(axis), tuple(tuple(p) for p in perm))


def axis_index(mesh: Mesh, axes) -> int:
    """This rank's index along ``axes`` (major to minor)."""
    return mesh.axis_index(axes)
