"""An engine's state as checkpoint tensors: parameters, optimizer state and masters, as blocks.

Every tensor is saved as this rank's tensor-parallel block with its global offsets, so a
checkpoint loads under another layout. Optimizer state comes from
:func:`meshpar.optim.state.full_optim_state_dict` (gathered over the data axis, so it does not
depend on the ZeRO stage or the data degree) and goes back through
:func:`~meshpar.optim.state.load_full_optim_state_dict`.

Names: ``model.<param>``, ``optim.master.<param>``, ``optim.state.<param>.<key>``.
Small picklable state (param groups, scaler, step counters, scheduler, RNG) is the ``extra``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .checkpoint import Block, as_block, checkpoint_metadata, load_checkpoint

if TYPE_CHECKING:
    from .engine import Engine


def _layout(engine: "Engine") -> dict[str, Block]:
    """Per parameter name: a Block describing its (tensor-parallel) local block and global offsets."""
    return {n: as_block(p) for n, p in engine.named_parameters()}


def rng_state() -> dict[str, Any]:
    out: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["cpu"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def engine_state(engine: "Engine") -> tuple[dict[str, Any], dict[str, Any]]:
    """``(tensors, extra)`` of ``engine``. Collective (gathers optimizer state over data)."""
    from ..optim.state import full_optim_state_dict, full_param_state

    opt = engine.optimizer
    lay = _layout(engine)
    tensors: dict[str, Any] = {}

    def blk(name: str, t: torch.Tensor) -> Block:
        ref = lay[name]
        t = t.reshape(ref.local.shape)
        return Block(t, ref.global_shape, ref.offsets)

    for name, t in full_param_state(opt).items():
        tensors[f"model.{name}"] = blk(name, t)
    sd = full_optim_state_dict(opt)
    for name, t in sd["master"].items():
        tensors[f"optim.master.{name}"] = blk(name, t)
    scalars: dict[str, dict[str, Any]] = {}
    for name, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.ndim >= 1:
                tensors[f"optim.state.{name}.{k}"] = blk(name, v)
            elif isinstance(v, torch.Tensor):
                tensors[f"optim.state.{name}.{k}"] = v.detach().clone()
            else:
                scalars.setdefault(name, {})[k] = v
    extra = {"param_groups": sd["param_groups"], "scaler": sd["scaler"], "optim_scalars": scalars,
             "global_step": engine.global_step, "skipped": engine.skipped, "rng": rng_state(),
             "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None}
    return tensors, extra


def load_engine_state(engine: "Engine", path: str) -> dict[str, Any]:
    """Load ``path`` (saved under any layout) into ``engine``; returns the extra state. Collective."""
    from ..optim.state import load_full_optim_state_dict

    md = checkpoint_metadata(path).state_dict_metadata
    lay = _layout(engine)
    everywhere = engine.model_param_names()  # with a pipeline, other stages' parameters are not loaded here
    names = sorted(everywhere, key=len, reverse=True)
    tensors: dict[str, Any] = {}
    master: dict[str, torch.Tensor] = {}
    state: dict[str, dict[str, Any]] = {n: {} for n in lay}
    for key, m in md.items():
        if key.startswith("optim.master."):
            name = key[len("optim.master."):]
            if name not in everywhere:
                raise KeyError(f"checkpoint has optimizer master {name!r} but the model has no such parameter")
            if name not in lay:
                continue
            t = torch.empty(lay[name].local.shape, dtype=m.properties.dtype, device=lay[name].local.device)
            master[name] = t
            tensors[key] = Block(t, lay[name].global_shape, lay[name].offsets)
        elif key.startswith("optim.state."):
            rest = key[len("optim.state."):]
            name = next((n for n in names if rest.startswith(n + ".")), None)
            if name is None:
                raise KeyError(f"checkpoint key {key!r} names no parameter of the model")
            if name not in lay:
                continue
            k = rest[len(name) + 1:]
            dev = lay[name].local.device
            if len(m.size) >= 1:
                t = torch.empty(lay[name].local.shape, dtype=m.properties.dtype, device=dev)
                tensors[key] = Block(t, lay[name].global_shape, lay[name].offsets)
            else:
                t = torch.empty((), dtype=m.properties.dtype, device=dev)
                tensors[key] = t
            state[name][k] = t
    missing = sorted(set(lay) - set(master))
    if missing:
        raise KeyError(f"checkpoint {path} lacks optimizer masters for {missing[:5]}")
    extra = load_checkpoint(path, tensors, mesh=engine.mesh)
    for name, sc in extra.get("optim_scalars", {}).items():
        state.setdefault(name, {}).update(sc)
    opt = engine.optimizer
    load_full_optim_state_dict(opt, {"state": state, "param_groups": extra["param_groups"], "master": master,
                                     "scaler": extra.get("scaler")})
    engine.global_step = int(extra.get("global_step", 0))
    engine.skipped = int(extra.get("skipped", 0))
    engine.micro = 0
    if engine.lr_scheduler is not None and extra.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(extra["lr_scheduler"])
    if "rng" in extra:
        set_rng_state(extra["rng"])
    return extra
