"""``parallelize(module, mesh, plan)``: lay out an unmodified ``nn.Module`` from outside (``meshpar.parallelize``).

The module is ``meshpar.parallel`` so that the name ``meshpar.parallelize`` stays the function.

A *plan* is a mapping, read in order (the first key that matches a parameter wins):

* **parameter globs** (fully qualified names, :mod:`fnmatch` syntax, e.g. ``"h.*.mlp.c_fc.weight"``;
  a glob naming a *module* applies to that module's own parameters) to a :class:`~meshpar.P`, or
  to a named style (:data:`STYLES`): ``"colwise"``, ``"rowwise"``, ``"summa"``, ``"tesseract"``,
  ``"cube"``, ``"vocab"``, ``"replicate"``, or ``(style, axes)`` / :class:`Style` to name the mesh
  axes. A bare style uses the mesh's *model axes* (every axis not in ``data_axes``/``pipe_axes``,
  in mesh order), so any axis names work.
* **module globs** to :class:`Layouts` (input / output activation layouts, applied by forward
  pre/post hooks; :func:`constrain` is the same inside a model's code). ``Layouts(blockwise=True)``
  runs a per-position module on each rank's local blocks (e.g. GPT-2's ``Conv1D``, whose
  ``x.view(-1, C)`` cannot merge a split sequence into the batch).

Styles resolve from the layer's weight orientation: ``nn.Linear`` stores ``[out, in]``, Hugging
Face's GPT-2 ``Conv1D`` stores ``[in, out]``, ``nn.Embedding`` ``[num, dim]``. With ``W`` written
``[in, out]`` and ``t``, ``(x, y)``, ``(d, x, y)``, ``(i, j, k)`` the style's axes:

==========  ==================  ===========  ========================================================
style       W [in, out]         bias [out]   activations (input -> output hidden split)
==========  ==================  ===========  ========================================================
colwise     P(None, t)          P(t)         whole -> t
rowwise     P(t, None)          P()          t -> partial sum over t (reduced where consumed)
summa       P(x, y)             P(y)         y -> y (batch over x), SUMMA 2D
tesseract   P(x, y)             P(y)         y -> y (batch over (d, x)), 2.5D
cube        P(k, (j, i))        P(j)         k -> j (batch over (i, j) -> (i, k)); axes (i, k, j)
                                             give the next layer's P(j, (k, i))
vocab       embedding P(t, None); a linear head as colwise
replicate   P() for every parameter
==========  ==================  ===========  ========================================================

**Batch contract.** Plain tensors given to the *root* module's input layouts are each data rank's
*local* batch: they are placed with :func:`~meshpar.from_local` over ``data_axes`` (the global
batch is the concatenation over data ranks), then sliced to the layout (free). Plain tensors at
inner modules are global values (:func:`~meshpar.shard`). A ShardedTensor input is taken as is
(resharded to the layout if it differs).

Every check (unknown names, styles that do not fit a layer, specs that do not divide) runs
before any parameter is converted, and no conversion communicates.
"""
from __future__ import annotations

import fnmatch
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from .errors import ShardingError
from .mesh import Mesh
from .nn.functional import constrain
from torch.utils._pytree import tree_flatten, tree_unflatten

from .sharding.api import shard, unshard
from .sharding.core import enter, reduce_unreduced, wrap
from .sharding.layout import block_slices, local_shape, validate
from .models.plans import STYLES, Layouts, Style, place_batch
from .sharding.spec import P, base_axis
from .sharding.tensor import ShardedTensor

__all__ = ["parallelize", "constrain", "Style", "Layouts", "STYLES", "resolve_plan", "place_batch",
           "load_dense", "dense_state_dict", "save_dense"]

DEFER_ATTR = "_meshpar_defer_reduce"
_N_AXES = {"colwise": 1, "rowwise": 1, "vocab": 1, "summa": 2, "tesseract": 3, "cube": 3, "replicate": 0}


# ---------------------------------------------------------------------------------------------- styles
def _orientation(mod: nn.Module) -> str:
    """``"oi"`` (nn.Linear), ``"io"`` (GPT-2 Conv1D), ``"emb"`` (nn.Embedding) or ``""`` (other)."""
    if isinstance(mod, nn.Linear):
        return "oi"
    if isinstance(mod, nn.Embedding):
        return "emb"
    if type(mod).__name__ == "Conv1D" and hasattr(mod, "nf"):
        return "io"
    return ""


def _model_axes(mesh: Mesh, skip: Iterable[str]) -> tuple[str, ...]:
    skip = set(skip)
    return tuple(a for a in mesh.names if a not in skip)


def _style_spec(style: Style, mod: nn.Module, leaf: str, pname: str, ndim: int, mesh: Mesh,
                skip: Sequence[str]) -> P:
    """The spec of parameter ``leaf`` (``"weight"``/``"bias"``) of ``mod`` under ``style``."""
    if style.name == "replicate":
        return P()
    axes = style.axes if style.axes is not None else _model_axes(mesh, skip)
    want = _N_AXES[style.name]
    if len(axes) != want:
        raise ShardingError(f"parameter {pname!r}: style {style.name!r} needs {want} mesh axis(es), got {axes} "
                            f"(mesh axes {mesh.names}, data/pipe axes {tuple(skip)}); name them as "
                            f"({style.name!r}, (axis, ...))")
    for a in axes:
        if a not in mesh.names:
            raise ShardingError(f"parameter {pname!r}: style {style.name!r} names axis {a!r}, not in {mesh}")
    kind = _orientation(mod)
    if kind == "":
        raise ShardingError(f"parameter {pname!r}: style {style.name!r} fits nn.Linear, GPT-2 Conv1D and "
                            f"nn.Embedding weights; {type(mod).__name__} is none of them: give a P(...) instead")
    if kind == "emb":
        if leaf != "weight":
            raise ShardingError(f"parameter {pname!r}: style {style.name!r} fits an embedding's weight only")
        table = {"vocab": P(axes[0] if axes else None, None), "colwise": P(None, axes[0] if axes else None),
                 "summa": P(*axes) if len(axes) == 2 else None, "tesseract": P(*axes[1:]) if len(axes) == 3 else None,
                 "cube": P((axes[0], axes[1]), axes[2]) if len(axes) == 3 else None}
        spec = table.get(style.name)
        if spec is None:
            raise ShardingError(f"parameter {pname!r}: style {style.name!r} does not fit an nn.Embedding; use "
                                "'vocab', 'colwise', 'summa', 'tesseract', 'cube', 'replicate' or a P(...)")
        return spec
    if leaf not in ("weight", "bias") or (leaf == "weight" and ndim != 2) or (leaf == "bias" and ndim != 1):
        raise ShardingError(f"parameter {pname!r}: style {style.name!r} fits a 2-D weight and a 1-D bias")
    name = "colwise" if style.name == "vocab" else style.name
    if name == "colwise":
        w, b = (None, axes[0]), P(axes[0])
    elif name == "rowwise":
        w, b = (axes[0], None), P()
    elif name == "summa":
        w, b = (axes[0], axes[1]), P(axes[1])
    elif name == "tesseract":
        w, b = (axes[1], axes[2]), P(axes[2])
    else:  # cube over (i, j, k): W[in, out] P(k, (j, i)), output split over j
        i, j, k = axes
        w, b = (k, (j, i)), P(j)
    if leaf == "bias":
        return b
    return P(w[1], w[0]) if kind == "oi" else P(*w)


def _as_rule(value: Any, key: str):
    """A plan value as a P, a Style or Layouts."""
    if isinstance(value, (P, Style, Layouts)):
        return value
    if value is None:
        return P()
    if isinstance(value, str):
        return Style(value)
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) and value[0] in STYLES:
        return Style(value[0], tuple(value[1]))
    raise ShardingError(f"plan[{key!r}] = {value!r}: expected a P(...), a style name {STYLES}, "
                        "(style, axes), a Style or a Layouts")


# ---------------------------------------------------------------------------------------------- resolve
def _owner(module: nn.Module, pname: str) -> tuple[str, nn.Module, str]:
    mname, _, leaf = pname.rpartition(".")
    return mname, module.get_submodule(mname) if mname else module, leaf


def resolve_plan(module: nn.Module, mesh: Mesh, plan: Mapping[str, Any], *, data_axes: Sequence[str] = (),
                 pipe_axes: Sequence[str] = ()) -> tuple[dict[str, P], dict[str, Layouts]]:
    """The spec of every parameter and the layouts of every module named by ``plan``; no side effects.

    Parameters no key matches are replicated (``P()``).

    Raises:
        ShardingError: a key matching no parameter/module, a style that does not fit its layer, a spec
            naming an unknown axis or not dividing the parameter's shape.
    """
    skip = tuple(data_axes) + tuple(pipe_axes)
    for a in skip:
        if a not in mesh.names:
            raise ShardingError(f"parallelize: data/pipe axis {a!r} is not an axis of {mesh}")
    params = dict(module.named_parameters())
    modules = dict(module.named_modules())
    specs: dict[str, P] = {}
    layouts: dict[str, Layouts] = {}
    for key, value in plan.items():
        rule = _as_rule(value, key)
        if isinstance(rule, Layouts):
            hit = [m for m in modules if fnmatch.fnmatchcase(m, key)]
            if not hit:
                raise ShardingError(f"plan key {key!r} (activation layouts) matches no module; modules are e.g. "
                                    f"{_examples(modules)}")
            for m in hit:
                layouts.setdefault(m, rule)
            continue
        hit = [n for n in params if fnmatch.fnmatchcase(n, key) or fnmatch.fnmatchcase(n.rpartition(".")[0], key)]
        if not hit:
            raise ShardingError(f"plan key {key!r} matches no parameter (nor a module with parameters); "
                                f"the closest parameters: {_examples(params, near=key)}")
        for n in hit:
            if n in specs:
                continue  # an earlier key wins
            mname, mod, leaf = _owner(module, n)
            p = params[n]
            spec = rule if isinstance(rule, P) else _style_spec(rule, mod, leaf, n, p.ndim, mesh, skip)
            validate(tuple(p.shape), spec, mesh, f"parameter {n!r} (plan key {key!r})")
            if spec.unreduced:
                raise ShardingError(f"parameter {n!r}: a parameter's spec cannot be unreduced ({spec})")
            specs[n] = spec
    for n in params:
        specs.setdefault(n, P())
    for m, lay in layouts.items():
        if lay.blockwise:
            prefix = f"{m}." if m else ""
            bad = [n for n in params if n.startswith(prefix) and (specs[n].sharded_axes() or specs[n].unreduced)]
            if bad:
                raise ShardingError(f"module {m!r} runs blockwise (Layouts(blockwise=True)) but its parameter {bad[0]!r} "
                                    f"is laid out as {specs[bad[0]]}; a blockwise module needs replicated parameters "
                                    "P() (each rank applies the whole weight to its own rows)")
    return specs, layouts


def _examples(names: Iterable[str], k: int = 6, near: str = "") -> str:
    """Up to ``k`` names, the closest to ``near`` first."""
    import difflib
    names = [n for n in names if n]
    close = difflib.get_close_matches(near, names, n=k, cutoff=0.0) if near else names[:k]
    return ", ".join(repr(n) for n in close) or "(none)"


# ---------------------------------------------------------------------------------------------- inputs
def _place(x, spec, mesh, data_axes, root: bool):
    if spec is None or not isinstance(x, torch.Tensor):
        return x
    if root:
        return place_batch(x, spec, mesh, data_axes)
    return constrain(x, spec) if isinstance(x, ShardedTensor) else shard(x, spec, mesh)


def _constrain_out(out, spec):
    if spec is None:
        return out
    if isinstance(out, torch.Tensor):
        return constrain(out, spec)
    if isinstance(spec, Mapping):
        for k, s in spec.items():
            if out[k] is not None:
                out[k] = constrain(out[k], s)
        return out
    if isinstance(out, tuple):
        specs = tuple(spec) if isinstance(spec, (tuple, list)) else (spec,)
        return type(out)(constrain(o, s) if s is not None and isinstance(o, torch.Tensor) else o
                         for o, s in zip(out, specs + (None,) * (len(out) - len(specs))))
    raise ShardingError(f"output layout {spec} does not fit an output of type {type(out).__name__}")


# ---------------------------------------------------------------------------------------------- blockwise
_BLOCKWISE_STATE = "_meshpar_blockwise_state"


def _blockwise_enter(mod: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of a ``Layouts(blockwise=True)`` module: its ShardedTensor inputs and its
    parameters become this rank's local blocks for ``forward`` (see :class:`Layouts`).

    Inputs ``[*lead, n]`` share one spec ``S`` with the last dim whole; parameters are ``P()``. Every check
    runs before anything changes. Returns the new ``(args, kwargs)`` (None when no input is sharded: the
    module then runs on plain tensors as written)."""
    leaves, tree = tree_flatten((args, kwargs))
    sharded = [t for t in leaves if isinstance(t, ShardedTensor)]
    if not sharded:
        return None
    name = type(mod).__name__
    if _BLOCKWISE_STATE in mod.__dict__:
        raise ShardingError(f"blockwise {name}: called again inside its own forward (not supported)")
    first = sharded[0]
    mesh, spec, gshape = first.mesh, first.spec.reduced(), tuple(first.shape)
    for t in sharded:
        if t.mesh != mesh or t.spec.reduced() != spec or len(t.shape) != len(gshape) \
                or tuple(t.shape[:-1]) != gshape[:-1]:
            raise ShardingError(f"blockwise {name}: its ShardedTensor inputs must share one layout; got "
                                f"{tuple(first.shape)} {first.spec} and {tuple(t.shape)} {t.spec} (lay them out with "
                                "Layouts(inputs=...))")
    if not gshape or spec.axes_of(len(gshape) - 1):
        raise ShardingError(f"blockwise {name}: the input {gshape} {spec} splits its last dim, which the module "
                            f"mixes; keep the last dim whole (e.g. Layouts(inputs=P(..., None)))")
    for t in leaves:
        if isinstance(t, torch.Tensor) and not isinstance(t, ShardedTensor) and t.ndim > 0:
            raise ShardingError(f"blockwise {name}: a plain tensor input {tuple(t.shape)} next to sharded ones (a "
                                "plain tensor is a global value, not a block); lay it out with Layouts(inputs=...)")
    params = []
    for sub in mod.modules():
        for leaf, p in sub._parameters.items():
            if p is None:
                continue
            if not isinstance(p, ShardedTensor) or p.mesh != mesh or p.spec.sharded_axes() or p.spec.unreduced:
                got = p.spec if isinstance(p, ShardedTensor) else "a plain tensor"
                raise ShardingError(f"blockwise {name}: parameter {leaf!r} of {type(sub).__name__} is {got}; a "
                                    f"blockwise module needs replicated parameters P() on {mesh} (each rank applies "
                                    "the whole weight to its own rows)")
            params.append((sub, leaf, p))
    vary = tuple(dict.fromkeys(base_axis(a) for a in spec.sharded_axes()))  # ranks see different rows
    mod.__dict__[_BLOCKWISE_STATE] = (params, mesh, spec, gshape)
    for sub, leaf, p in params:  # restored by _blockwise_exit, also when forward raises
        sub._parameters[leaf] = enter(p, vary)
    local = [enter(reduce_unreduced(t)) if isinstance(t, ShardedTensor) else t for t in leaves]
    return tree_unflatten(local, tree)


def _blockwise_exit(mod: nn.Module, args: tuple, out: Any):
    """Forward hook (always called) of a blockwise module: put its parameters back and lay out every
    tensor output ``[*lead, m]`` (local) as the inputs' spec, global shape ``[*lead_global, m]``."""
    state = mod.__dict__.pop(_BLOCKWISE_STATE, None)
    if state is None:
        return None
    params, mesh, spec, gshape = state
    for sub, leaf, p in params:
        sub._parameters[leaf] = p
    if out is None:
        return None
    lead = tuple(local_shape(gshape, spec, mesh))[:-1]

    def back(o):
        if not isinstance(o, torch.Tensor) or isinstance(o, ShardedTensor):
            return o
        if o.ndim != len(gshape) or tuple(o.shape[:-1]) != lead:
            raise ShardingError(f"blockwise {type(mod).__name__}: an output block {tuple(o.shape)} does not keep the "
                                f"leading dims {lead} of the input block; only per-position modules [..., n] -> "
                                "[..., m] run blockwise")
        return wrap(o, spec, mesh, gshape[:-1] + (o.shape[-1],))

    leaves, tree = tree_flatten(out)
    return tree_unflatten([back(o) for o in leaves], tree)


def _install_hooks(mod: nn.Module, lay: Layouts, mesh: Mesh, data_axes: tuple[str, ...], root: bool) -> None:
    ins = lay.inputs
    in_specs = () if ins is None else ((ins,) if isinstance(ins, P) else tuple(ins))
    if in_specs or lay.kwargs:
        def pre(m, args, kwargs):
            args = tuple(_place(a, s, mesh, data_axes, root) if i < len(in_specs) else a
                         for i, (a, s) in enumerate(zip(args, in_specs + (None,) * len(args))))
            kwargs = {k: _place(v, lay.kwargs.get(k), mesh, data_axes, root) for k, v in kwargs.items()}
            return args, kwargs
        mod.register_forward_pre_hook(pre, with_kwargs=True)
    if lay.blockwise:  # after the input layouts, before the output layout
        mod.register_forward_pre_hook(_blockwise_enter, with_kwargs=True)
        mod.register_forward_hook(_blockwise_exit, always_call=True)
    if lay.output is not None:
        def out_hook(m, args, out):
            return _constrain_out(out, lay.output)
        # only lays out the module's result: a caller that uses the weight without the result may skip it
        # (the GPT's chunked loss head, meshpar.models.gpt._hooked)
        out_hook._meshpar_output_layout = True
        mod.register_forward_hook(out_hook)


# ---------------------------------------------------------------------------------------------- apply
def parallelize(module: nn.Module, mesh: Mesh, plan: Mapping[str, Any], *, data_axes: Sequence[str] | None = None,
                pipe_axes: Sequence[str] = (), defer_reduce: Sequence[str] = ()) -> nn.Module:
    """Convert ``module``'s parameters in place to ShardedTensors laid out by ``plan``; returns ``module``.

    Args:
        module: any ``nn.Module`` (its code is not changed; parameter names are kept).
        mesh: the mesh.
        plan: see the module docstring (parameter globs -> spec/style; module globs -> :class:`Layouts`).
        data_axes: the batch (data-parallel) axes: excluded from bare styles' axes, and the axes over
            which the root's plain inputs are local batches. Default: ``("data",)`` if the mesh has it.
        pipe_axes: pipeline axes, excluded from bare styles' axes.
        defer_reduce: axes over which parameter gradients are left unreduced (for a DP/ZeRO reducer).
    Raises:
        ShardingError: see :func:`resolve_plan` (raised before any parameter changes).
    """
    if data_axes is None:
        data_axes = ("data",) if "data" in mesh.names else ()
    data_axes = tuple(data_axes)
    specs, layouts = resolve_plan(module, mesh, plan, data_axes=data_axes, pipe_axes=pipe_axes)
    defer = tuple(a for a in defer_reduce if a in mesh.names)
    holders: dict[int, list[tuple[nn.Module, str]]] = {}  # tied parameters: every (module, attribute) of one object
    for mod in module.modules():
        for leaf, p in mod._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append((mod, leaf))
    for name, spec in specs.items():
        mname, mod, leaf = _owner(module, name)
        p = getattr(mod, leaf)
        if isinstance(p, ShardedTensor):
            if p.spec != spec or p.mesh is not mesh:
                raise ShardingError(f"parameter {name!r} is already laid out as {p.spec}; parallelize a dense model")
            continue
        with torch.no_grad():
            t = shard(p.detach(), spec, mesh)
        new = nn.Parameter(t, requires_grad=p.requires_grad)
        if defer:
            setattr(new, DEFER_ATTR, defer)
        for m, attr in holders[id(p)]:
            setattr(m, attr, new)
    for mname, lay in layouts.items():
        _install_hooks(module.get_submodule(mname) if mname else module, lay, mesh, data_axes, root=mname == "")
    return module


# ---------------------------------------------------------------------------------------------- weights
def _to_local_block(p: ShardedTensor, full_or_slice) -> torch.Tensor:
    sl = block_slices(p._gshape, p.spec, p.mesh)
    return full_or_slice[sl]


@torch.no_grad()
def load_dense(module: nn.Module, source, *, strict: bool = True) -> list[str]:
    """Copy dense weights into ``module`` (parallelized or not); each rank reads only its blocks.

    Args:
        source: a dense ``state_dict`` (name -> tensor) or the path of a ``.safetensors`` file (read
            with ``safe_open(...).get_slice``, so a rank reads only the rows/columns of its blocks).
        strict: raise when a parameter is missing from ``source`` or has another shape.
    Returns:
        the names in ``source`` that are not parameters of ``module``.
    """
    params = dict(module.named_parameters())
    if isinstance(source, Mapping):
        names, get = list(source), (lambda n: source[n])
        shape_of = (lambda n: tuple(source[n].shape))
        opened = None
    else:
        from safetensors import safe_open
        opened = safe_open(str(source), framework="pt")
        names = list(opened.keys())
        get = opened.get_slice
        shape_of = (lambda n: tuple(opened.get_slice(n).get_shape()))
    missing = [n for n in params if n not in names]
    if strict and missing:
        raise KeyError(f"load_dense: {len(missing)} parameter(s) missing from the source, e.g. {missing[:4]}")
    for n, p in params.items():
        if n not in names:
            continue
        if tuple(shape_of(n)) != tuple(p.shape):
            raise ShardingError(f"load_dense: {n!r} has shape {tuple(shape_of(n))} in the source, "
                                f"{tuple(p.shape)} in the model")
        src = get(n)
        if isinstance(p, ShardedTensor):
            block = _to_local_block(p, src)
            p._local.copy_(block)
        else:
            p.copy_(src[...] if opened is not None else src)
    return [n for n in names if n not in params]


def dense_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as a dense tensor (collective: every rank must call it)."""
    out = {}
    with torch.no_grad():
        for n, t in list(module.named_parameters()) + list(module.named_buffers()):
            out[n] = (unshard(t) if isinstance(t, ShardedTensor) else t).detach().clone()
    return out


def save_dense(module: nn.Module, path: str, *, rank0_only: bool = True) -> None:
    """Write the dense parameters to a ``.safetensors`` file (collective; rank 0 writes by default).

    Tied parameters are stored once per name (copies), so the file loads with :func:`load_dense`.
    """
    import torch.distributed as dist
    from safetensors.torch import save_file
    sd = {n: t.contiguous() for n, t in dense_state_dict(module).items()}
    if not rank0_only or not dist.is_initialized() or dist.get_rank() == 0:
        save_file(sd, str(path))
