"""Ring attention over local sequence blocks (forward and backward are both rings).

Every rank holds ``q, k, v [B, H, S_loc, D]`` (its sequence block(s), see
:mod:`~meshpar.ops.attention.layout`). Forward, step ``t = 0 .. sp-1``: the rank holds the K/V block
of rank ``me - t``; it starts sending that block on to ``me + 1`` (async ``ppermute``), computes
its query rows against it (skipping fully masked chunk pairs), merges the partial result with
log-sum-exp, then waits for the next block. K and V travel stacked as one tensor, so a step is one
``ppermute`` of ``2*B*H*S_loc*D`` elements and the forward moves ``sp-1`` of them.

Backward: K/V travel the same way; next to them travels a dK/dV accumulator (float32, float64 for
float64 inputs). At step ``t`` the rank adds its contribution for the visiting block to the
accumulator that arrived with it, and sends the accumulator on; after ``sp`` sends every
accumulator is back at its owner, complete. The send of step ``t`` overlaps the compute of step
``t+1``. Nothing full-length is ever materialized: memory is O(S_loc).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from cuda_ops import ring as ring_kernel

from ...mesh import Mesh
from ...mesh import collectives as C
from . import trace
from .block import BlockMeta, acc_dtype, block_backward, block_forward, expand_kv, merge_, reduce_kv
from .layout import step_blocks


def _ring_perm(sp: int) -> list[tuple[int, int]]:
    return [(i, (i + 1) % sp) for i in range(sp)]


def _merge(out_acc, lse_acc, o, l) -> None:
    """:func:`merge_`, by the ``cuda_ops`` ring_merge kernel when it applies (CUDA, fp32 accumulators)."""
    if out_acc.is_cuda and ring_kernel.merge_applies(out_acc, lse_acc, o, l):
        ring_kernel.merge_(out_acc, lse_acc, o, l)
    else:
        merge_(out_acc, lse_acc, o, l)


def _acc_grads(dq_acc, d_q, dk_acc, dv_acc, d_k, d_v, rep: int) -> None:
    """``dq_acc += d_q``, ``dk_acc += reduce_kv(d_k)``, ``dv_acc += reduce_kv(d_v)``: one CUDA kernel when it
    applies (the GQA sum then in fp32), else the torch ops."""
    if dq_acc.is_cuda and ring_kernel.grad_applies(dq_acc, d_q, dk_acc, dv_acc, d_k, d_v, rep):
        ring_kernel.grad_acc_(dq_acc, d_q, dk_acc, dv_acc, d_k, d_v, rep)
        return
    dq_acc += d_q
    dk_acc += reduce_kv(d_k, rep)
    dv_acc += reduce_kv(d_v, rep)


def _chunk(s_loc: int, balanced: bool) -> int:
    return s_loc // 2 if balanced else s_loc


class RingAttention(torch.autograd.Function):
    """``RingAttention.apply(q, k, v, mesh, axes, causal, balanced, scale, impl) -> out``.

    ``q [B, H, Sq_loc, D]``, ``k, v [B, H_kv, Sk_loc, D]`` local blocks (``H % H_kv == 0``: grouped-query
    attention; K/V travel with ``H_kv`` heads and are repeated per block), ``out`` like ``q``. Inputs
    must already be validated (:func:`~meshpar.ops.attention.checks.check_local`); this function
    only communicates.
    """

    @staticmethod
    def forward(ctx, q, k, v, mesh: Mesh, axes, causal: bool, balanced: bool, scale: float, impl: str):
        sp, me = mesh.size(axes), mesh.axis_index(axes)
        perm = _ring_perm(sp)
        sq, sk = q.shape[-2], k.shape[-2]
        rep = q.shape[1] // k.shape[1]
        acc = acc_dtype(q.dtype)
        kv = torch.stack([k, v])
        out_acc = lse_acc = None
        metas: list[BlockMeta] = []  # per block, in schedule order: the backward visits the same blocks
        with C.op_name("ring_attention"):
            for step in range(sp):
                src = (me - step) % sp
                nxt = C.ppermute(kv, mesh, axes, perm, async_op=True) if step < sp - 1 else None
                for blk in step_blocks(me, src, sp, causal=causal, balanced=balanced, q_len=sq, kv_len=sk):
                    trace.record("fwd", step, blk, _chunk(sq, balanced))
                    o, l, meta = block_forward(q[:, :, blk.q], expand_kv(kv[0][:, :, blk.kv], rep),
                                               expand_kv(kv[1][:, :, blk.kv], rep),
                                               causal=blk.causal, scale=scale, impl=impl)
                    metas.append(meta)
                    if out_acc is None:  # step 0, own block: covers every query row
                        out_acc, lse_acc = o.to(acc).clone(), l.to(acc).clone()
                    else:
                        _merge(out_acc[:, :, blk.q], lse_acc[:, :, blk.q], o, l)
                if nxt is not None:
                    kv = nxt.wait()
        out = out_acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse_acc)
        ctx.args = (mesh, axes, causal, balanced, scale, impl, metas)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        mesh, axes, causal, balanced, scale, impl, metas = ctx.args
        metas = iter(metas)
        sp, me = mesh.size(axes), mesh.axis_index(axes)
        perm = _ring_perm(sp)
        sq, sk = q.shape[-2], k.shape[-2]
        rep = q.shape[1] // k.shape[1]
        acc = acc_dtype(q.dtype)
        dout = dout.contiguous()
        delta = (dout.to(acc) * out.to(acc)).sum(-1) if impl == "math" else None
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        kv = torch.stack([k, v])
        dkv_pending = None
        with C.op_name("ring_attention.backward"):
            for step in range(sp):
                src = (me - step) % sp
                nxt = C.ppermute(kv, mesh, axes, perm, async_op=True) if step < sp - 1 else None
                dkv = torch.zeros(kv.shape, dtype=acc, device=kv.device)
                for blk in step_blocks(me, src, sp, causal=causal, balanced=balanced, q_len=sq, kv_len=sk):
                    trace.record("bwd", step, blk, _chunk(sq, balanced))
                    d_q, d_k, d_v = block_backward(
                        dout[:, :, blk.q], q[:, :, blk.q], expand_kv(kv[0][:, :, blk.kv], rep),
                        expand_kv(kv[1][:, :, blk.kv], rep),
                        out[:, :, blk.q], lse[:, :, blk.q], causal=blk.causal, scale=scale, impl=impl,
                        meta=next(metas), delta=None if delta is None else delta[:, :, blk.q])
                    _acc_grads(dq[:, :, blk.q], d_q, dkv[0][:, :, blk.kv], dkv[1][:, :, blk.kv], d_k, d_v, rep)
                if dkv_pending is not None:  # the accumulator that travelled with this K/V block
                    dkv += dkv_pending.wait()
                dkv_pending = C.ppermute(dkv, mesh, axes, perm, async_op=True)
                if nxt is not None:
                    kv = nxt.wait()
            dkv = dkv_pending.wait()  # our own block's accumulator, back home and complete
        return (dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype),
                None, None, None, None, None, None)
