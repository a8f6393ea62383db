"""Parallelism plans as tables of specs.

:data:`TABLES` / :func:`parallel_plan`: the plans that :func:`meshpar.parallelize` applies from outside
to plain models: meshpar's GPT (``"gpt"``: 1d, 2d, 2.5d, 3d, sp, 1d+sp), a nanoGPT-style module, Hugging
Face GPT-2 and Llama. A mode is a table of parameter globs -> styles or spec templates and module globs
-> activation layouts, nothing else; the model code is the same in every mode and the dispatcher reads
the specs (see docs/parallelize.md for the layouts of each mode).

:func:`place_batch` is the batch contract: a data rank's *local* batch laid out as a spec for free.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from ..errors import ShardingError
from ..mesh import Mesh
from ..sharding.api import from_local, reshard, shard
from ..sharding.spec import P, Zigzag, base_axis
from ..sharding.tensor import ShardedTensor


def place_batch(x: torch.Tensor, spec: P, mesh: Mesh, data_axes: Sequence[str]) -> torch.Tensor:
    """Lay out a data rank's *local* batch ``x`` as ``spec`` (the batch contract).

    ``x`` is this data rank's block of the global batch (same on the ranks of one data replica):
    it is viewed with :func:`~meshpar.from_local` over ``spec``'s data axes only, then sliced to
    ``spec`` (no communication). A ShardedTensor is resharded to ``spec`` (a no-op when it matches).
    """
    if isinstance(x, ShardedTensor):
        return reshard(x, spec) if x.spec != spec else x
    data = set(data_axes)
    kept = []
    for d in range(len(spec)):
        axes = spec.axes_of(d)
        mine = tuple(a for a in axes if base_axis(a) in data)
        if mine and axes[:len(mine)] != mine:
            raise ShardingError(f"input spec {spec}: the data axes {mine} must lead dim {d}'s axes {axes} "
                                "(a local batch is one contiguous block per data rank)")
        kept.append(mine if mine else None)
    local_spec = P(*kept)
    if not local_spec.sharded_axes():
        return shard(x, spec, mesh)
    y = from_local(x, local_spec, mesh)
    return reshard(y, spec) if y.spec != spec else y


# ===================================================================================== plans from outside
STYLES = ("colwise", "rowwise", "summa", "tesseract", "cube", "vocab", "replicate")


@dataclass(frozen=True)
class Style:
    """A named layout style over explicit mesh axes (``None``: the mesh's model axes)."""
    name: str
    axes: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.name not in STYLES:
            raise ShardingError(f"unknown style {self.name!r}; choose one of {STYLES} or give a P(...)")


@dataclass(frozen=True)
class Layouts:
    """Activation layouts at a module boundary.

    Attributes:
        inputs: a spec per positional tensor argument (one ``P`` = the first argument; ``None`` entries
            leave an argument alone), applied before ``forward``.
        kwargs: specs for keyword tensor arguments, by name.
        output: the spec of a tensor output, a tuple of specs for a tuple output, or a mapping
            ``{key: spec}`` for a dict-like output (e.g. ``{"logits": P(...)}``).
        blockwise: run ``forward`` on every rank's local blocks, with no communication. For a module
            that treats every position of its inputs' leading dims independently (a per-token layer)
            but whose code merges those dims in a way a sharded tensor cannot follow, e.g. GPT-2's
            ``Conv1D`` (``x.view(-1, C) @ W`` on a sequence split over "sp": a rank's rows of the merged
            ``[B*T]`` dim are not one block). The ShardedTensor inputs (after ``inputs``) must share one
            layout that leaves the last dim whole, and the module's parameters must be replicated
            (``P()``); each tensor output ``[..., n]`` gets that layout (global leading sizes of the
            inputs) and the parameters' gradients are summed over the mesh axes that split the inputs.
            The plan asserts the per-position property; meshpar cannot check it.
    """
    inputs: Any = None
    kwargs: Mapping[str, P] = field(default_factory=dict)
    output: Any = None
    blockwise: bool = False


# Tables for :func:`meshpar.parallel.parallelize`: parameter globs -> style or spec template,
# module globs -> activation layouts. A template is a tuple of entries, one per tensor dim, written
# with the symbols ``"B"`` (the batch axes: the data axes, then the mode's own batch axes), ``"B'"`` (3d's
# second batch layout: the data axes, then i, k; elsewhere the same as ``"B"``), ``"tp"``, ``"x"``, ``"y"``,
# ``"d"``, ``"i"``, ``"j"``, ``"k"``, ``"sp"`` (the mode's axes); :func:`parallel_plan` substitutes the
# caller's axis names. A value is a style name (on the mode's axes of :data:`_STYLE_AXES`), a
# :class:`Style` naming table axes, or a spec template.
# Keys ending in ``">"`` are module globs whose value is ``(input templates, output template)``, or
# ``(input templates, output template, True)`` for a blockwise module (:attr:`Layouts.blockwise`).

_NANO_1D = {
    "transformer.wte.weight": "vocab",  # tied: lm_head.weight is the same parameter (colwise over the vocab)
    "transformer.h.*.attn.c_attn.*": "colwise", "transformer.h.*.attn.c_proj.*": "rowwise",
    "transformer.h.*.mlp.c_fc.*": "colwise", "transformer.h.*.mlp.c_proj.*": "rowwise",
    # the fused q/k/v output is split by .split(C): gather it (a sharded split is not supported yet)
    "transformer.h.*.attn.c_attn>": ((), ("B",)),
    ">": ((("B",), ("B",)), None),
}
_NANO_2D = {
    "transformer.wte.weight": (None, "y"), "transformer.wpe.weight": (None, "y"),
    "transformer.h.*.ln_*": ("y",), "transformer.ln_f.*": ("y",),
    "transformer.h.*.attn.c_attn.*": "summa", "transformer.h.*.attn.c_proj.*": "summa",
    "transformer.h.*.mlp.c_fc.*": "summa", "transformer.h.*.mlp.c_proj.*": "summa",
    "transformer.h.*.attn.c_attn>": ((), ("B",)),
    "transformer.h.*.attn.c_proj>": ((("B", None, "y"),), None),
    ">": ((("B",), ("B",)), None),
}
_NANO_SP = {
    # parameters replicated; activations split on the sequence (ring attention in SDPA); the logits are
    # gathered before the model's logits.view(-1, V) (merging a split sequence into the batch is not supported)
    ">": ((("B", "sp"), ("B",)), None),
    "lm_head>": ((), ("B",)),
}
_GPT2 = "transformer.h.*."
_HF_GPT2_1D = {
    "transformer.wte.weight": "vocab",
    _GPT2 + "attn.c_attn.*": "colwise", _GPT2 + "attn.c_proj.*": "rowwise",
    _GPT2 + "mlp.c_fc.*": "colwise", _GPT2 + "mlp.c_proj.*": "rowwise",
    _GPT2 + "attn.c_attn>": ((), ("B",)),
    ">": ((("B",),), None),
}
_HF_GPT2_2D = {
    "transformer.wte.weight": (None, "y"), "transformer.wpe.weight": (None, "y"),
    _GPT2 + "ln_*": ("y",), "transformer.ln_f.*": ("y",),
    _GPT2 + "attn.c_attn.*": "summa", _GPT2 + "attn.c_proj.*": "summa",
    _GPT2 + "mlp.c_fc.*": "summa", _GPT2 + "mlp.c_proj.*": "summa",
    _GPT2 + "attn.c_attn>": ((), ("B",)),
    _GPT2 + "attn.c_proj>": ((("B", None, "y"),), None),
    ">": ((("B",),), None),
}
_HF_GPT2_SP = {
    # parameters replicated; every activation split on the sequence (ring or all-to-all attention in SDPA).
    # Conv1D flattens [B, T, C] to [B*T, C] (a rank's rows of the merged dim are not one block when T is
    # split), so every Conv1D runs blockwise: the per-token matmul on the local [b, T/sp, C] block, no
    # communication, the weight gradients summed over the batch and sequence axes
    _GPT2 + "attn.c_*>": ((), None, True), _GPT2 + "mlp.c_*>": ((), None, True),
    ">": ((("B", "sp"),), None),
    # gather the sequence before the tied LM head (HF slices hidden_states[:, logits_to_keep] and the loss
    # flattens the logits to [B*T, V])
    "transformer.ln_f>": ((), ("B",)),
}
_LLAMA = "model.layers.*."
_HF_LLAMA_1D = {
    "model.embed_tokens.weight": "vocab",
    _LLAMA + "self_attn.[qkv]_proj.weight": "colwise", _LLAMA + "self_attn.o_proj.weight": "rowwise",
    _LLAMA + "mlp.gate_proj.weight": "colwise", _LLAMA + "mlp.up_proj.weight": "colwise",
    _LLAMA + "mlp.down_proj.weight": "rowwise",
    "lm_head.weight": "colwise",
    ">": ((("B",),), None),
}
_HF_LLAMA_2D = {
    "model.embed_tokens.weight": (None, "y"),
    # HF's RMSNorm runs in float32: with the hidden dim split over y its float32 sum runs in another order
    _LLAMA + "*layernorm.weight": ("y",), "model.norm.weight": ("y",),
    _LLAMA + "self_attn.*_proj.weight": "summa", _LLAMA + "mlp.*_proj.weight": "summa",
    "lm_head.weight": "summa",
    ">": ((("B",),), None),
}
_HF_LLAMA_SP = {
    ">": ((("B", "sp"),), None),
    # gather the sequence before the LM head (HF slices hidden_states[:, logits_to_keep])
    "model.norm>": ((), ("B",)),
}

# meshpar's own GPT (meshpar.models.gpt: separate q/k/v, untied LM head, nn.Linear [out, in])
_GPT_1D = {
    "wte.weight": "vocab",
    "h.*.attn.[qkv]": "colwise", "h.*.attn.proj": "rowwise",
    "h.*.mlp.fc": "colwise", "h.*.mlp.proj": "rowwise",
    "lm_head.weight": "colwise",
    ">": ((("B",), ("B",)), None),  # the root: idx and targets are local batches
    "wte>": ((("B",),), None),  # the token ids as the root lays them out (pipeline blocks start here)
}
_GPT_2D = {
    "wte.weight": (None, "y"), "wpe.weight": (None, "y"),
    "h.*.ln_*": ("y",), "ln_f.*": ("y",),
    "h.*.attn.*": "summa", "h.*.mlp.*": "summa", "lm_head.weight": "summa",
    ">": ((("B",), ("B",)), None),
    "wte>": ((("B",),), None),  # the token ids as the root lays them out (pipeline blocks start here)
}
_GPT_25D = {
    "wte.weight": (None, "y"), "wpe.weight": (None, "y"),
    "h.*.ln_*": ("y",), "ln_f.*": ("y",),
    "h.*.attn.*": "tesseract", "h.*.mlp.*": "tesseract", "lm_head.weight": "tesseract",
    ">": ((("B",), ("B",)), None),
    "wte>": ((("B",),), None),  # the token ids as the root lays them out (pipeline blocks start here)
}
_GPT_SP = {
    # parameters replicated (gradients summed over sp); every activation split on the sequence (ring or
    # all-to-all attention in SDPA); the logits are gathered over the sequence before logits.reshape(-1, V)
    # (merging a split sequence into the batch is not supported)
    ">": ((("B", "sp"), ("B",)), None),
    "lm_head>": ((), ("B",)),
    "wte>": ((("B", "sp"),), None),  # the token ids as the root lays them out (pipeline blocks start here)
}
_GPT_1D_SP = {
    "wte.weight": "vocab",
    "h.*.attn.[qkv]": "colwise", "h.*.attn.proj": "rowwise",
    "h.*.mlp.fc": "colwise", "h.*.mlp.proj": "rowwise",
    "lm_head.weight": "colwise",
    ">": ((("B", "sp"), ("B",)), None),
    "lm_head>": ((), ("B", None, "tp")),
    "wte>": ((("B", "sp"),), None),  # the token ids as the root lays them out (pipeline blocks start here)
}

# 3D (axes i, j, k; a q x q x q cube): the two kinds of linear layers alternate the layout. resid -> inner
# (q/k/v, mlp.fc, lm_head: cube on (i, j, k), W[in, out] P(k, (j, i)), bias P(j)) takes x P(B, None, k) with
# B = (data.., i, j) to P(B', None, j) with B' = (data.., i, k); inner -> resid (attn.proj, mlp.proj: cube on
# (i, k, j), W P(j, (k, i)), bias P(k)) takes it back. The heads are split over j. Every activation gets its
# layout from the weights' specs (the 3D rule); only the model's inputs are laid out: the token ids as the
# residual stream's batch (B), the targets as the logits' batch (B').
_CUBE_IN, _CUBE_OUT = Style("cube", ("i", "j", "k")), Style("cube", ("i", "k", "j"))
_GPT_3D = {
    "wte.weight": "cube",  # [V, C] P((i, j), k): the ids' batch axes split the vocabulary (vocab-parallel lookup)
    "wpe.weight": (None, "k"),
    "h.*.ln_*": ("k",), "ln_f.*": ("k",),
    "h.*.attn.[qkv]": _CUBE_IN, "h.*.attn.proj": _CUBE_OUT,
    "h.*.mlp.fc": _CUBE_IN, "h.*.mlp.proj": _CUBE_OUT,
    "lm_head.weight": _CUBE_IN,  # logits [B, T, V] P(B', None, j)
    ">": ((("B",), ("B'",)), None),  # the root: idx and targets are local batches
    "wte>": ((("B",),), None),  # the token ids as the root lays them out (pipeline blocks start here)
}

#: model -> mode -> table; the mode's axes: 1d (tp), 2d (x, y), 2.5d (d, x, y), 3d (i, j, k), sp (sp), 1d+sp (tp, sp)
TABLES = {
    "gpt": {"1d": _GPT_1D, "2d": _GPT_2D, "2.5d": _GPT_25D, "3d": _GPT_3D, "sp": _GPT_SP, "1d+sp": _GPT_1D_SP},
    "nanogpt": {"1d": _NANO_1D, "2d": _NANO_2D, "sp": _NANO_SP},
    "hf_gpt2": {"1d": _HF_GPT2_1D, "2d": _HF_GPT2_2D, "sp": _HF_GPT2_SP},
    "hf_llama": {"1d": _HF_LLAMA_1D, "2d": _HF_LLAMA_2D, "sp": _HF_LLAMA_SP},
}
_MODE_AXES = {"1d": ("tp",), "2d": ("x", "y"), "2.5d": ("d", "x", "y"), "3d": ("i", "j", "k"), "sp": ("sp",),
              "1d+sp": ("tp", "sp")}
_STYLE_AXES = {"colwise": ("tp",), "rowwise": ("tp",), "vocab": ("tp",), "summa": ("x", "y"),
               "tesseract": ("d", "x", "y"), "cube": ("i", "j", "k")}
#: the mode's own axes the activations' batch dim is split over (after the data axes): symbol "B"
_BATCH_AXES = {"2d": ("x",), "2.5d": ("d", "x"), "3d": ("i", "j")}
#: 3d's second batch layout (symbol "B'"): the batch of the inner activations and the logits
_INNER_BATCH_AXES = {"3d": ("i", "k")}


def parallel_plan(model: str, mode: str, *, data: Sequence[str] = (), balanced: bool = False,
                  **axes: str) -> dict:
    """The :func:`~meshpar.parallelize.parallelize` plan of ``model`` in ``mode`` on the caller's axis names.

    Args:
        model: a key of :data:`TABLES` (``"gpt"``, ``"nanogpt"``, ``"hf_gpt2"``, ``"hf_llama"``).
        mode: a key of ``TABLES[model]``: ``"1d"``, ``"2d"``, ``"2.5d"``, ``"3d"``, ``"sp"``, ``"1d+sp"``.
        data: the data-parallel axes (batch), e.g. ``("data",)``.
        balanced: sequence-parallel modes: lay the sequence out ``Zigzag(sp)`` (load-balanced causal
            ring attention; rank ``r`` holds chunks ``r`` and ``2sp-1-r``).
        **axes: the mode's axes under their table names mapped to yours, e.g. ``tp="model"``
            (default: the table names ``tp``, ``x``, ``y``, ``d``, ``i``, ``j``, ``k``, ``sp``).
    Returns:
        ``{glob: P | Style | Layouts}``.
    Raises:
        ShardingError: unknown model, mode, or axis symbol.
    """
    if model not in TABLES:
        raise ShardingError(f"no plan table for model {model!r}; known: {sorted(TABLES)}")
    if mode not in TABLES[model]:
        raise ShardingError(f"model {model!r} has no {mode!r} plan; its modes: {sorted(TABLES[model])}")
    names = {a: axes.get(a, a) for a in _MODE_AXES[mode]}
    unknown = set(axes) - set(names)
    if unknown:
        raise ShardingError(f"mode {mode!r} has axes {_MODE_AXES[mode]}; got unknown {sorted(unknown)}")
    if balanced and "sp" not in names:
        raise ShardingError(f"balanced=True is a sequence-parallel layout; mode {mode!r} does not split the sequence")
    batch = tuple(data) + tuple(names[a] for a in _BATCH_AXES.get(mode, ()))
    inner_batch = tuple(data) + tuple(names[a] for a in _INNER_BATCH_AXES.get(mode, _BATCH_AXES.get(mode, ())))

    def entry(e):
        if e == "B":
            return batch if batch else None
        if e == "B'":
            return inner_batch if inner_batch else None
        if e == "sp" and balanced:
            return Zigzag(names["sp"])
        return names[e] if isinstance(e, str) else e

    def spec(t):
        return None if t is None else P(*(entry(e) for e in t))

    out: dict = {}
    for key, value in TABLES[model][mode].items():
        if key.endswith(">"):
            ins, outp, *blockwise = value
            out[key[:-1]] = Layouts(inputs=tuple(spec(t) for t in ins) or None, output=spec(outp),
                                    blockwise=bool(blockwise and blockwise[0]))
        elif isinstance(value, str):
            out[key] = Style(value, tuple(names[a] for a in _STYLE_AXES[value]))
        elif isinstance(value, Style):  # a style on table axes named explicitly (e.g. 3d's alternating cube)
            out[key] = Style(value.name, tuple(names[a] for a in value.axes))
        else:
            out[key] = spec(value)
    return out
