"""Parallelism plans as tables of specs.

* :data:`TABLES` / :func:`parallel_plan` (bottom of this module): the plans that
  :func:`meshpar.parallelize` applies from outside to plain models: meshpar's GPT (``"gpt"``: 1d, 2d,
  2.5d, sp, 1d+sp), a nanoGPT-style module, Hugging Face GPT-2 and Llama.
* :class:`Plan` / :func:`make_plan` / :func:`shard_params` (LEGACY: the mode-level plan object;
  ``Plan.place`` applies the batch contract, and the 3d layout lives here until the plain GPT has a 3d table), described below.

Legacy: parallelism plans for the functional GPT: a mode is a table of specs, nothing else.

A :class:`Plan` assigns a :class:`~meshpar.P` to every parameter (by its *role*) and to the
activations, and says to which multiples the vocabulary, hidden, head and MLP sizes are padded
so every sharded dimension divides. The model code (:mod:`meshpar.models.gpt`) is the same in
every mode; the dispatcher reads the specs and runs the matching algorithm.

Roles and layouts (``B`` = the batch axes: ``"data"`` first when the mesh has it):

==========  =======================  ======================  =========================  ==========================
role        1d (tp)                  2d (x,y) / 2.5d (d,x,y)  3d (i,j,k)                 dense
==========  =======================  ======================  =========================  ==========================
tokens      P(B)                     P(B)  B=(..,[d],x)       P(B)  B=(..,i,j)            —
resid       P(B, None, None)         P(B, None, "y")          P(B, None, "k")             —
inner       P(B, None, "tp")         P(B, None, "y")          P(B', None, "j") B'=(..,i,k) —
wte [V,C]   P("tp", None)            P("x", "y")              P(("i","j"), "k")           —
wpe [T,C]   P()                      P(None, "y")             P(None, "k")                —
norm [C]    P()                      P("y")                   P("k")                      —
w_in        P(None, "tp")            P("x", "y")              P("k", ("j","i"))           —
b_in        P("tp")                  P("y")                   P("j")                      —
w_out       P("tp", None)            P("x", "y")              P("j", ("k","i"))           —
b_out       P()                      P("y")                   P("k")                      —
==========  =======================  ======================  =========================  ==========================

``w_in`` are q/k/v, mlp.fc and the LM head (resid -> inner layout); ``w_out`` are attn.proj and
mlp.proj (inner -> resid). In 1d the output of a ``w_out`` matmul is a partial sum over "tp",
reduced by the ``resid`` constraint (Megatron's row-parallel all-reduce).

Sequence parallel modes split the sequence (dim 1) of every activation over the mesh axis "sp"
(``S`` below: ``"sp"``, or ``Zigzag("sp")`` with ``balanced=True``):

==========  =======================  ==========================
role        sp (sp)                  1d+sp (tp, sp)
==========  =======================  ==========================
tokens      P(B, S)                  P(B, S)
resid       P(B, S, None)            P(B, S, None)
inner       P(B, S, None)            P(B, S, "tp")
weights     P() (all replicated)     as 1d
==========  =======================  ==========================

Norms, MLPs, the embedding, the LM head and the loss are per token and run blockwise on the
sequence blocks (replicated weights get their gradients summed over "sp"). Attention runs ring
attention (``sequence_mode="ring"``) or all-to-all attention (``"all_to_all"``, which pads the
heads to a multiple of sp, or of tp*sp with "1d+sp") on the local blocks; position embeddings
are looked up at each block's global positions. With ``balanced=True`` the sequence dim is
``Zigzag("sp")`` (rank ``r`` holds chunks ``r`` and ``2sp-1-r``) so causal ring work is equal on
every rank; ``shard``/``unshard`` permute, so tokens, targets and logits stay in natural order
(see docs/sequence-parallel.md).
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

MODES = ("dense", "1d", "2d", "2.5d", "3d", "sp", "1d+sp")
#: the mesh axes of each mode (besides an optional "data")
_TP_AXES = {"1d": ("tp",), "2d": ("x", "y"), "2.5d": ("d", "x", "y"), "3d": ("i", "j", "k"), "sp": ("sp",),
            "1d+sp": ("tp", "sp")}
SEQUENCE_MODES = ("ring", "all_to_all")
#: the pipeline axis a plan's mesh may carry besides its mode's axes and "data" (no spec names it)
PIPE_AXIS = "pipe"


@dataclass(frozen=True)
class Plan:
    """Specs for the parameters and activations of one parallel mode.

    Attributes:
        mode: one of :data:`MODES`.
        mesh: the mesh (None for "dense").
        act: activation specs by name: ``tokens`` [B,T], ``resid`` [B,T,C], ``inner`` [B,T,*],
            ``logits`` [B,T,V], ``targets`` [B,T].
        roles: parameter specs by role (see the module table).
        multiples: padding multiples ``{"vocab", "embd", "heads", "ff"}``.
        seq_axes: the spec axes of the activations' sequence dim (1): ``("sp",)``, ``(Zigzag("sp"),)``
            when balanced, ``()`` when whole.
        sequence_mode: attention over a split sequence: ``"ring"`` or ``"all_to_all"``.
        balanced: the sequence dim is ``Zigzag("sp")`` (load-balanced causal layout), so causal
            ring attention does equal work on every rank.
    """

    mode: str
    mesh: Mesh | None
    act: Mapping[str, P] = field(default_factory=dict)
    roles: Mapping[str, P] = field(default_factory=dict)
    multiples: Mapping[str, int] = field(default_factory=lambda: {"vocab": 1, "embd": 1, "heads": 1, "ff": 1})
    seq_axes: tuple[str, ...] = ()
    sequence_mode: str = "ring"
    balanced: bool = False

    @property
    def dense(self) -> bool:
        return self.mesh is None

    @property
    def seq_split(self) -> int:
        """Number of sequence blocks (1 when the sequence is whole)."""
        return self.mesh.size(self.seq_axes) if self.seq_axes else 1

    @property
    def seq_multiple(self) -> int:
        """The sequence length must be a multiple of this (``2*sp`` in the balanced layout)."""
        return self.seq_split * (2 if self.balanced else 1)

    def spec(self, name: str) -> P | None:
        """The spec of parameter ``name`` (None in dense mode)."""
        return None if self.dense else self.roles[param_role(name)]

    def place(self, x: torch.Tensor, act: str) -> torch.Tensor:
        """Lay out an input ``x`` as ``act`` (a free local slice): ``x`` is this data rank's *local*
        batch (the batch contract, :func:`place_batch`); a ShardedTensor is taken as is.

        With a split sequence, ``x``'s dim 1 must divide into :attr:`seq_multiple` blocks (in the
        balanced layout each rank keeps its two zigzag chunks; ``x`` is in natural order).
        """
        if self.dense or isinstance(x, ShardedTensor):
            return x
        if self.seq_axes and x.ndim >= 2:
            T = x.shape[1]
            if T % self.seq_multiple:
                how = f"2*sp = {self.seq_multiple} (balanced layout)" if self.balanced else f"sp = {self.seq_multiple}"
                raise ShardingError(f"sequence length {T} (dim 1 of {act}) is not divisible by {how} over mesh "
                                    f"axes {self.seq_axes}; use a sequence length that is a multiple of "
                                    f"{self.seq_multiple}")
        return place_batch(x, self.act[act], self.mesh, ("data",))


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


def param_role(name: str) -> str:
    """The role of a GPT parameter name (see the module table)."""
    last = name.split(".")
    if name in ("wte", "wpe"):
        return name
    if name == "lm_head.weight":
        return "w_in"
    if "ln_" in name:
        return "norm"
    kind = last[-1]
    owner = last[-2] if len(last) >= 2 else ""
    if owner in ("q", "k", "v", "fc"):
        return "w_in" if kind == "weight" else "b_in"
    if owner == "proj":
        return "w_out" if kind == "weight" else "b_out"
    raise KeyError(f"no plan role for parameter {name!r}")


def _batch(mesh: Mesh, *axes: str):
    lead = ("data",) if "data" in mesh.names else ()
    full = lead + axes
    return full if full else None


def make_plan(mode: str, mesh: Mesh | None = None, *, sequence_mode: str = "ring", balanced: bool = False) -> Plan:
    """The plan of ``mode`` on ``mesh``.

    Args:
        mode: "dense" (no mesh), "1d" (axis "tp"), "2d" ("x","y", square), "2.5d" ("d","x","y",
            x == y), "3d" ("i","j","k", a cube), "sp" (axis "sp": sequence parallel), "1d+sp"
            ("tp", "sp": Megatron 1D with a split sequence). A mesh axis "data" adds data
            parallelism on the batch. A mesh axis "pipe" (pipeline stages, see
            :mod:`meshpar.models.gpt_pipeline`) is allowed and named by no spec: every pipe rank
            lays out its own stage's parameters and activations over the other axes.
        sequence_mode: attention over the split sequence in "sp"/"1d+sp": "ring" or "all_to_all".
        balanced: "sp"/"1d+sp" only: zigzag (load-balanced causal) sequence layout.
    Raises:
        ShardingError: when the mesh lacks the mode's axes, has extra axes, or is not square/cubic,
            or the sequence options are bad.
    """
    if mode not in MODES:
        raise ShardingError(f"unknown parallel mode {mode!r}; choose one of {MODES}")
    if sequence_mode not in SEQUENCE_MODES:
        raise ShardingError(f"unknown sequence_mode {sequence_mode!r}; choose one of {SEQUENCE_MODES}")
    if balanced and mode not in ("sp", "1d+sp"):
        raise ShardingError(f"balanced=True is a sequence-parallel layout; mode {mode!r} does not split the "
                            "sequence (use mode 'sp' or '1d+sp')")
    if mode == "dense":
        if mesh is not None:
            raise ShardingError("the 'dense' plan takes no mesh (pass mesh=None)")
        return Plan("dense", None)
    if mesh is None:
        raise ShardingError(f"mode {mode!r} needs a mesh with axes {_TP_AXES[mode]} (and optionally 'data')")
    want = set(_TP_AXES[mode])
    have = set(mesh.names) - {"data", PIPE_AXIS}
    if have != want:
        raise ShardingError(f"mode {mode!r} needs mesh axes {_TP_AXES[mode]} (plus optional 'data' and "
                            f"'{PIPE_AXIS}'); {mesh} has {mesh.names}. Build e.g. Mesh(shape, "
                            f"{('data',) + _TP_AXES[mode]})")
    s = {a: mesh.size(a) for a in mesh.names}
    if mode in ("sp", "1d+sp"):
        return _sp_plan(mode, mesh, s, sequence_mode, balanced)
    if mode == "1d":
        t = s["tp"]
        b = _batch(mesh)
        act = dict(tokens=P(b), resid=P(b, None, None), inner=P(b, None, "tp"), logits=P(b, None, "tp"),
                   targets=P(b))
        roles = dict(wte=P("tp", None), wpe=P(), norm=P(), w_in=P(None, "tp"), b_in=P("tp"),
                     w_out=P("tp", None), b_out=P())
        mult = dict(vocab=t, embd=t, heads=t, ff=t)
    elif mode in ("2d", "2.5d"):
        if s["x"] != s["y"]:
            raise ShardingError(f"mode {mode!r} needs a square x*y grid; {mesh} has x={s['x']}, y={s['y']}. "
                                "Use q*q ranks for x and y")
        q = s["x"]
        b = _batch(mesh, *(("d", "x") if mode == "2.5d" else ("x",)))
        act = dict(tokens=P(b), resid=P(b, None, "y"), inner=P(b, None, "y"), logits=P(b, None, "y"), targets=P(b))
        roles = dict(wte=P("x", "y"), wpe=P(None, "y"), norm=P("y"), w_in=P("x", "y"), b_in=P("y"),
                     w_out=P("x", "y"), b_out=P("y"))
        mult = dict(vocab=q, embd=q, heads=q, ff=q)
    else:
        if not s["i"] == s["j"] == s["k"]:
            raise ShardingError(f"mode '3d' needs a cube i=j=k; {mesh} has i={s['i']}, j={s['j']}, k={s['k']}")
        q = s["i"]
        ba, bb = _batch(mesh, "i", "j"), _batch(mesh, "i", "k")
        act = dict(tokens=P(ba), resid=P(ba, None, "k"), inner=P(bb, None, "j"), logits=P(bb, None, "j"),
                   targets=P(bb))
        roles = dict(wte=P(("i", "j"), "k"), wpe=P(None, "k"), norm=P("k"), w_in=P("k", ("j", "i")), b_in=P("j"),
                     w_out=P("j", ("k", "i")), b_out=P("k"))
        mult = dict(vocab=q * q, embd=q * q, heads=q, ff=q * q)
    return Plan(mode, mesh, act, roles, mult)


def _sp_plan(mode: str, mesh: Mesh, s: Mapping[str, int], sequence_mode: str, balanced: bool) -> Plan:
    """The "sp" / "1d+sp" plans (see the module table)."""
    b = _batch(mesh)
    sp = s["sp"]
    seq = Zigzag("sp") if balanced else "sp"
    if mode == "sp":
        act = dict(tokens=P(b, seq), resid=P(b, seq, None), inner=P(b, seq, None), logits=P(b, seq, None),
                   targets=P(b, seq))
        roles = dict(wte=P(), wpe=P(), norm=P(), w_in=P(), b_in=P(), w_out=P(), b_out=P())
        t = 1
    else:
        t = s["tp"]
        act = dict(tokens=P(b, seq), resid=P(b, seq, None), inner=P(b, seq, "tp"), logits=P(b, seq, "tp"),
                   targets=P(b, seq))
        roles = dict(wte=P("tp", None), wpe=P(), norm=P(), w_in=P(None, "tp"), b_in=P("tp"),
                     w_out=P("tp", None), b_out=P())
    heads = t * sp if sequence_mode == "all_to_all" else t  # all-to-all splits each rank's heads over sp
    mult = dict(vocab=t, embd=t, heads=heads, ff=t)
    return Plan(mode, mesh, act, roles, mult, seq_axes=(seq,), sequence_mode=sequence_mode, balanced=balanced)


@dataclass(frozen=True)
class Sizes:
    """Padded model sizes under a plan (equal to the config's in dense mode)."""
    vocab: int
    n_embd: int
    n_head: int
    d_ff: int
    head_dim: int


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def padded_sizes(cfg, plan: Plan) -> Sizes:
    """Sizes after padding: extra all-zero heads (so heads and hidden divide), vocab rows, MLP columns.

    Zero padding is exact: padded heads, columns and rows stay zero and get zero gradients.
    """
    if cfg.n_embd % cfg.n_head:
        raise ShardingError(f"n_embd {cfg.n_embd} must be a multiple of n_head {cfg.n_head}")
    hd = cfg.n_embd // cfg.n_head
    m = plan.multiples
    n_head = cfg.n_head
    while n_head % m["heads"] or (n_head * hd) % m["embd"]:
        n_head += 1
    return Sizes(vocab=_round_up(cfg.vocab_size, m["vocab"]), n_embd=n_head * hd, n_head=n_head,
                 d_ff=_round_up(4 * cfg.n_embd, m["ff"]), head_dim=hd)


def param_dims(name: str) -> tuple[str, ...]:
    """Logical dims of a GPT parameter: "V" vocab, "C" hidden, "F" MLP hidden, "T" positions."""
    if name == "wte":
        return ("V", "C")
    if name == "wpe":
        return ("T", "C")
    if name == "lm_head.weight":
        return ("C", "V")
    parts = name.split(".")
    kind, owner = parts[-1], parts[-2]
    if "ln_" in owner:
        return ("C",)
    if owner == "fc":
        return ("C", "F") if kind == "weight" else ("F",)
    if owner == "proj" and parts[-3] == "mlp":
        return ("F", "C") if kind == "weight" else ("C",)
    return ("C", "C") if kind == "weight" else ("C",)


def _pad(t: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    if tuple(t.shape) == sizes:
        return t
    out = t.new_zeros(sizes)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def _sizes_of(name: str, shape, sz: Sizes) -> tuple[int, ...]:
    table = {"V": sz.vocab, "C": sz.n_embd, "F": sz.d_ff}
    return tuple(table.get(d, n) for d, n in zip(param_dims(name), shape))


def shard_params(params: Mapping[str, torch.Tensor], cfg, plan: Plan) -> dict[str, torch.Tensor]:
    """Pad the dense ``params`` to the plan's sizes and shard each by its role's spec (no communication).

    Returns plain tensors (the originals) in dense mode.
    """
    if plan.dense:
        return dict(params)
    sz = padded_sizes(cfg, plan)
    out = {}
    for name, t in params.items():
        out[name] = shard(_pad(t.detach(), _sizes_of(name, t.shape, sz)), plan.spec(name), plan.mesh)
    return out


def unpad(name: str, t: torch.Tensor, cfg) -> torch.Tensor:
    """The real (unpadded) part of a global parameter or gradient ``t`` of parameter ``name``."""
    table = {"V": cfg.vocab_size, "C": cfg.n_embd, "F": 4 * cfg.n_embd}
    return t[tuple(slice(0, table.get(d, n)) for d, n in zip(param_dims(name), t.shape))]


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
    """
    inputs: Any = None
    kwargs: Mapping[str, P] = field(default_factory=dict)
    output: Any = None


# Tables for :func:`meshpar.parallel.parallelize`: parameter globs -> style or spec template,
# module globs -> activation layouts. A template is a tuple of entries, one per tensor dim, written
# with the symbols ``"B"`` (the batch axes: the data axes, then the mode's own batch axes), ``"B'"`` (3d's
# second batch layout: the data axes, then i, k; elsewhere the same as ``"B"``), ``"tp"``, ``"x"``, ``"y"``,
# ``"d"``, ``"i"``, ``"j"``, ``"k"``, ``"sp"`` (the mode's axes); :func:`parallel_plan` substitutes the
# caller's axis names. A value is a style name (on the mode's axes of :data:`_STYLE_AXES`), a
# :class:`Style` naming table axes, or a spec template.
# Keys ending in ``">"`` are module globs whose value is ``(input templates, output template)``.

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
    "hf_gpt2": {"1d": _HF_GPT2_1D, "2d": _HF_GPT2_2D},
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
            ins, outp = value
            out[key[:-1]] = Layouts(inputs=tuple(spec(t) for t in ins) or None, output=spec(outp))
        elif isinstance(value, str):
            out[key] = Style(value, tuple(names[a] for a in _STYLE_AXES[value]))
        elif isinstance(value, Style):  # a style on table axes named explicitly (e.g. 3d's alternating cube)
            out[key] = Style(value.name, tuple(names[a] for a in value.axes))
        else:
            out[key] = spec(value)
    return out
