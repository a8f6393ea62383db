"""State dicts of a ZeroOptimizer: full (gathered over data) and sharded (torch.distributed.checkpoint).

*Full* state dicts hold, for each parameter, tensors of the parameter's **local block** shape
(the whole parameter for plain tensors; the tensor-parallel block for ShardedTensors), gathered
over the data axis: they do not depend on the ZeRO stage or on the data-parallel degree, so a
checkpoint taken with ZeRO-3 on 8 ranks loads into ZeRO-1 on 2. They are collective.

*Sharded* state dicts hold this rank's flat slices as DTensors sharded over the data axis
(``Shard(0)`` of each padded bucket), which ``torch.distributed.checkpoint`` saves and loads
in parallel without gathering (same bucket layout on load).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..mesh import collectives as C
from .layout import Bucket

if TYPE_CHECKING:
    from .zero import ZeroOptimizer


def _full_flat(zo: "ZeroOptimizer", b: Bucket, t: torch.Tensor) -> torch.Tensor:
    """``t`` is the bucket's owned slice (stages 1-3) or full bucket (stage 0): return the full bucket."""
    if zo.stage == 0 or t.numel() == b.padded:
        return t
    return C.all_gather(t.contiguous(), zo.mesh, zo.axis, 0)


def _split(b: Bucket, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    return {e.name: flat[e.offset:e.offset + e.numel].view(e.shape).clone() for e in b.entries}


@torch.no_grad()
def full_param_state(zo: "ZeroOptimizer", master: bool = False) -> dict[str, torch.Tensor]:
    """Each parameter's local block, by name (``master=True``: the fp32 master copy). Collective."""
    out: dict[str, torch.Tensor] = {}
    for b in zo.buckets:
        if master:
            src = b.master
        else:
            src = b.flat
        out.update(_split(b, _full_flat(zo, b, src)))
    return out


@torch.no_grad()
def full_optim_state_dict(zo: "ZeroOptimizer") -> dict[str, Any]:
    """``{"state": {name: {key: tensor|scalar}}, "param_groups": [...], "master": {name: tensor},
    "scaler": ...}``; identical on every rank. Collective."""
    state: dict[str, dict[str, Any]] = {}
    for b in zo.buckets:
        st = zo.inner.state.get(b.master, {})
        for e in b.entries:
            state.setdefault(e.name, {})
        for k, v in sorted(st.items()):
            if isinstance(v, torch.Tensor) and v.numel() == b.master.numel() and v.ndim == 1:
                for name, t in _split(b, _full_flat(zo, b, v)).items():
                    state[name][k] = t
            else:
                for e in b.entries:
                    state[e.name][k] = v.clone() if isinstance(v, torch.Tensor) else v
    groups = [{k: v for k, v in g.items() if k != "params"} for g in zo.inner.param_groups]
    for gi, g in enumerate(groups):
        g["param_names"] = [e.name for b in zo.buckets if b.group == gi for e in b.entries]
    return {"state": state, "param_groups": groups, "master": full_param_state(zo, master=True),
            "scaler": zo.scaler.state_dict() if zo.scaler is not None else None, "stage": zo.stage}


def _own(zo: "ZeroOptimizer", b: Bucket, per_name: dict[str, torch.Tensor], dtype, device) -> torch.Tensor:
    flat = torch.zeros(b.padded, dtype=dtype, device=device)
    for e in b.entries:
        flat[e.offset:e.offset + e.numel].copy_(per_name[e.name].reshape(-1))
    return flat if zo.stage == 0 else flat[b.lo:b.hi].clone()


@torch.no_grad()
def load_full_optim_state_dict(zo: "ZeroOptimizer", sd: dict[str, Any]) -> None:
    """Inverse of :func:`full_optim_state_dict` (any stage / data degree that has the same parameters)."""
    for gi, g in enumerate(sd["param_groups"]):
        zo.inner.param_groups[gi].update({k: v for k, v in g.items() if k != "param_names"})
    zo.inner.state.clear()
    for b in zo.buckets:
        m = b.master
        m.copy_(_own(zo, b, sd["master"], m.dtype, m.device))
        first = sd["state"].get(b.entries[0].name, {})
        st = {}
        for k, v in first.items():
            if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape == b.entries[0].shape:
                st[k] = _own(zo, b, {e.name: sd["state"][e.name][k] for e in b.entries}, v.dtype, m.device)
            else:
                st[k] = v.clone() if isinstance(v, torch.Tensor) else v
        if st:
            zo.inner.state[m] = st
    if sd.get("scaler") is not None and zo.scaler is not None:
        zo.scaler.load_state_dict(sd["scaler"])
    zo._write_back()


def _device_mesh(zo: "ZeroOptimizer"):
    from torch.distributed.device_mesh import DeviceMesh
    dev = zo.buckets[0].flat.device.type
    group = zo.mesh.group(zo.axis)
    if group is None:
        return None
    return DeviceMesh.from_group(group, dev)


def sharded_state_dict(zo: "ZeroOptimizer") -> dict[str, Any]:
    """This rank's slices as DTensors over the data axis, for ``torch.distributed.checkpoint``.

    Keys: ``b{i}.{tp}.param``, ``b{i}.{tp}.master``, ``b{i}.{tp}.{state}`` where ``tp`` names this
    rank's coordinates on the non-data axes (their blocks differ). Scalars are stored as tensors.
    """
    from torch.distributed.tensor import DTensor, Shard
    dm = _device_mesh(zo)
    tp = "_".join(f"{a}{zo.mesh.coord(a)}" for a in zo.mesh.names if a != zo.axis) or "r"

    def wrap(t: torch.Tensor, b: Bucket) -> Any:
        if dm is None:
            return t
        if zo.stage == 0:
            t = t[b.lo:b.hi]
        return DTensor.from_local(t.contiguous(), dm, [Shard(0)], run_check=False, shape=(b.padded,),
                                  stride=(1,))

    out: dict[str, Any] = {}
    for b in zo.buckets:
        key = f"b{b.index}.{tp}"
        own_params = b.flat if zo.stage == 3 else b.flat[b.lo:b.hi] if zo.stage >= 1 else b.flat
        out[f"{key}.param"] = wrap(own_params, b)
        out[f"{key}.master"] = wrap(b.master, b)
        for k, v in zo.inner.state.get(b.master, {}).items():
            if isinstance(v, torch.Tensor) and v.ndim == 1 and v.numel() == b.master.numel():
                out[f"{key}.{k}"] = wrap(v, b)
            else:
                out[f"{key}.{k}"] = torch.as_tensor(v).clone()
    return out


@torch.no_grad()
def load_sharded_state_dict(zo: "ZeroOptimizer", sd: dict[str, Any]) -> None:
    """Copy a (loaded-in-place) :func:`sharded_state_dict` back into the optimizer.

    Typical use: ``sd = sharded_state_dict(zo); dcp.load(sd, ...); load_sharded_state_dict(zo, sd)``.
    """
    tp = "_".join(f"{a}{zo.mesh.coord(a)}" for a in zo.mesh.names if a != zo.axis) or "r"

    def local(v):
        return v.to_local() if hasattr(v, "to_local") else v

    for b in zo.buckets:
        key = f"b{b.index}.{tp}"
        m = local(sd[f"{key}.master"])
        if zo.stage == 0 and m.numel() != b.master.numel():
            m = C.all_gather(m.contiguous(), zo.mesh, zo.axis, 0)
        b.master.copy_(m)
        st = zo.inner.state.setdefault(b.master, {})
        prefix = f"{key}."
        for k, v in sd.items():
            if not k.startswith(prefix) or k[len(prefix):] in ("param", "master"):
                continue
            name = k[len(prefix):]
            v = local(v)
            if v.ndim == 1 and zo.stage == 0 and v.numel() * zo.nd == b.padded:
                v = C.all_gather(v.contiguous(), zo.mesh, zo.axis, 0)
            st[name] = v.clone()
    zo._write_back()
