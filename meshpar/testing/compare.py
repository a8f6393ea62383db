"""Run a function on sharded operands and on dense float64 operands; compare values and gradients.

The comparison is what every meshpar correctness test does::

    from meshpar.testing import Sharded, assert_sharded_equal

    # inside a worker (or a torchrun rank) that has a mesh
    assert_sharded_equal(lambda a, b, c: a * b + c,
                         Sharded(A, P("x")),                       # a ShardedTensor laid out P("x")
                         Sharded(B, P(None, unreduced=("y",))),    # a partial sum over y (random shares)
                         2.5,                                      # a Python scalar
                         mesh=mesh)

Each argument is one of

* :class:`Sharded` ``(value, spec)``: the global ``value`` laid out by ``spec`` (``shard``), or, when
  ``spec.unreduced`` is set, split into random *shares* that sum exactly to the value over the
  unreduced axes (:func:`partial_shares`, then ``from_local``): the sharded run sees a genuine
  partial sum (the dense run gets ``splittable(value)``, the value the shares add up to);
* a plain ``torch.Tensor``: passed as is to both runs (a value every rank holds);
* anything else (Python scalars, dims, dtypes): passed as is.

Both runs get fresh leaves: the dense run ``value`` in float64, the sharded run the layouts above.
The outputs (any pytree of tensors and Python values) are brought to global tensors
(``unshard``); values are compared, then a random cotangent is back-propagated through both and
the gradients of every floating operand (and, for an ``nn.Module``, of every parameter) are
compared. The outcome is ``pass``, ``refuse`` (meshpar said no: a :class:`~meshpar.ShardingError`
or a meshpar ``NotImplementedError``), ``wrong`` (numbers differ) or ``crash`` (any other error).
"""
from __future__ import annotations

import copy
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten, tree_map

from ..errors import CollectiveTimeout, ShardingError
from ..mesh import Mesh, current_mesh
from ..sharding import P, ShardedTensor, from_local, shard, unshard
from ..sharding.layout import take_block

_MESHPAR_DIR = str(Path(__file__).resolve().parent.parent)


@dataclass(frozen=True)
class Sharded:
    """An operand of :func:`compare_sharded`: the global ``value`` laid out by ``spec`` in the sharded run."""
    value: torch.Tensor
    spec: P


@dataclass
class Outcome:
    """Result of one comparison.

    ``status``: ``pass`` | ``refuse`` | ``wrong`` | ``crash`` | ``skip`` (the dense run itself failed).
    ``stage``: where it was decided (``forward`` or ``backward``). ``detail``: the error or the
    mismatch. ``max_err``: largest absolute difference seen. ``out_specs``: specs of the sharded
    outputs (pytree order), for tests that also check layouts.
    """
    status: str
    stage: str = "forward"
    detail: str = ""
    max_err: float = 0.0
    out_specs: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "pass"


def classify_error(e: BaseException) -> str:
    """``refuse`` for meshpar's own refusals (ShardingError, a NotImplementedError raised inside
    meshpar), ``crash`` for anything else (CollectiveTimeout included)."""
    if isinstance(e, CollectiveTimeout):
        return "crash"
    if isinstance(e, ShardingError):
        return "refuse"
    if isinstance(e, NotImplementedError):
        tb = traceback.extract_tb(e.__traceback__)
        if tb and str(Path(tb[-1].filename).resolve()).startswith(_MESHPAR_DIR):
            return "refuse"
    return "crash"


def splittable(value: torch.Tensor, drop_bits: int = 5) -> torch.Tensor:
    """``value`` with its ``drop_bits`` lowest mantissa bits cleared (float64/float32; others unchanged),
    so that the dyadic shares of :func:`partial_shares` and their sums are exact in floating point."""
    if value.dtype == torch.float64:
        ival = value.detach().contiguous().view(torch.int64)
        return (ival & ~((1 << drop_bits) - 1)).view(torch.float64)
    if value.dtype == torch.float32:
        ival = value.detach().contiguous().view(torch.int32)
        return (ival & ~((1 << drop_bits) - 1)).view(torch.float32)
    return value.detach()


def _share_coefficients(n: int) -> list[float]:
    """``n`` dyadic coefficients summing exactly to 1: ``[1.5, -0.5, 0.25, -0.25, ...]`` (0 for an odd tail)."""
    if n == 1:
        return [1.0]
    c = [1.5, -0.5]
    while len(c) + 2 <= n:
        c += [0.25, -0.25]
    return c + [0.0] * (n - len(c))


def partial_shares(value: torch.Tensor, spec: P, mesh: Mesh, seed: int = 0) -> torch.Tensor:
    """This rank's block of ``value`` under ``spec``, as its share of a partial sum over ``spec.unreduced``.

    Member ``i`` of the unreduced axes holds ``c[k] * value_block`` elementwise, with dyadic
    coefficients ``c`` summing to 1 (``1.5, -0.5, 0.25, -0.25, ...``) assigned to the members by a
    random permutation per element (``seed``; every rank draws the same, so no communication). On a
    value passed through :func:`splittable` every share and every partial sum is exact, so the blocks
    add up to the value bit for bit: a test never confuses rounding with a wrong answer. The shares
    are those of ``splittable(value)`` (applied here), so the dense reference must use
    ``splittable(value)`` too (:func:`compare_sharded` does).
    """
    blk = take_block(splittable(value) if spec.unreduced else value.detach(), P(*spec.entries), mesh)
    axes = spec.unreduced
    n = mesh.size(axes) if axes else 1
    if n == 1 or not blk.is_floating_point():
        return blk.clone()
    gen = torch.Generator().manual_seed(seed)
    perm = torch.argsort(torch.rand((n, blk.numel()), generator=gen), dim=0)     # [n, numel]
    me = mesh.axis_index(axes)
    flat = blk.reshape(-1)
    share = flat * torch.tensor(_share_coefficients(n), dtype=blk.dtype)[perm[me]]
    # inf/nan cannot be split (inf - inf is nan): member 0 holds them whole, the others zero
    fin = torch.isfinite(flat)
    if not bool(fin.all()):
        share = torch.where(fin, share, flat if me == 0 else torch.zeros_like(flat))
    return share.reshape(blk.shape).contiguous()


def _to_global(x):
    return unshard(x) if isinstance(x, ShardedTensor) else x


def _specs(out) -> list:
    flat, _ = tree_flatten(out)
    return [x.spec for x in flat if isinstance(x, ShardedTensor)]


def _diff(a, b, rtol: float, atol: float) -> tuple[bool, float, str]:
    """(equal?, max abs error, description) of two pytrees of tensors / Python values."""
    fa, sa = tree_flatten(a)
    fb, sb = tree_flatten(b)
    if sa != sb or len(fa) != len(fb):
        return False, float("inf"), f"structure differs: {sa} vs {sb}"
    worst = 0.0
    for i, (x, y) in enumerate(zip(fa, fb)):
        if isinstance(y, torch.Tensor):
            if not isinstance(x, torch.Tensor):
                return False, float("inf"), f"output {i}: got {type(x).__name__}, expected a tensor"
            if isinstance(x, ShardedTensor):
                x = unshard(x)
            if tuple(x.shape) != tuple(y.shape):
                return False, float("inf"), f"output {i}: shape {tuple(x.shape)} vs dense {tuple(y.shape)}"
            if x.dtype != y.dtype:
                return False, float("inf"), f"output {i}: dtype {x.dtype} vs dense {y.dtype}"
            x, y = x.detach(), y.detach()
            if x.numel() == 0:
                continue
            if not (y.is_floating_point() or y.is_complex()):
                if not torch.equal(x, y):
                    return False, float("inf"), f"output {i}: {y.dtype} values differ"
                continue
            fin = torch.isfinite(y)
            if not torch.equal(fin, torch.isfinite(x)) or not torch.equal(x[~fin].nan_to_num(), y[~fin].nan_to_num()):
                return False, float("inf"), f"output {i}: non-finite entries differ"
            if fin.any():
                err = (x[fin] - y[fin]).abs()
                worst = max(worst, float(err.max()))
                if bool((err > atol + rtol * y[fin].abs()).any()):
                    return False, worst, f"output {i}: max abs error {worst:.3g}"
        elif isinstance(y, float) and isinstance(x, float):
            if not (abs(x - y) <= atol + rtol * abs(y) or (x != x and y != y)):
                return False, abs(x - y), f"output {i}: {x} vs dense {y}"
        elif x != y:
            return False, float("inf"), f"output {i}: {x!r} vs dense {y!r}"
    return True, worst, ""


def _float_leaf(t: torch.Tensor, grad: bool) -> torch.Tensor:
    leaf = t.detach().clone()
    if grad and (leaf.is_floating_point() or leaf.is_complex()):
        leaf.requires_grad_()
    return leaf


def compare_sharded(fn: Callable, args: tuple, kwargs: dict | None = None, *, mesh: Mesh | None = None,
                    param_specs: dict[str, P] | None = None, backward: bool = True, inplace: bool = False,
                    rtol: float = 1e-7, atol: float = 1e-9, seed: int = 0) -> Outcome:
    """Run ``fn`` dense (float64 global operands) and sharded; compare values and gradients.

    ``fn`` may be an ``nn.Module``: the dense run uses a float64 copy, the sharded run a copy whose
    parameters are ShardedTensors laid out by ``param_specs`` (name -> spec; replicated when
    absent); parameter gradients are compared too. ``inplace=True`` passes clones of the leaves (so
    ``fn`` may modify its first operand in place, as ``a.add_(b)`` does) and compares gradients of
    the leaves. See the module docstring for the argument kinds and the outcome.
    """
    kwargs = kwargs or {}
    mesh = current_mesh(mesh)
    is_mod = isinstance(fn, torch.nn.Module)

    # ------------------------------------------------------------------ dense
    def dense_arg(a):
        if isinstance(a, Sharded):
            return _float_leaf(splittable(a.value) if a.spec.unreduced else a.value, backward)
        if isinstance(a, torch.Tensor):
            return _float_leaf(a, backward)
        return a
    d_leaves = [dense_arg(a) for a in args]
    d_kw = {k: dense_arg(v) for k, v in kwargs.items()}
    d_fn = copy.deepcopy(fn).double() if is_mod else fn
    d_call = [(x.clone() if inplace and isinstance(x, torch.Tensor) else x) for x in d_leaves]
    try:
        ref = d_fn(*d_call, **d_kw)
    except Exception as e:  # noqa: BLE001 - the dense op itself refuses this input
        return Outcome("skip", detail=f"dense run failed: {type(e).__name__}: {e}")

    # ------------------------------------------------------------------ sharded
    def sharded_arg(a):
        if isinstance(a, Sharded):
            v = a.value.detach()
            if a.spec.unreduced:
                v = splittable(v)
                st = from_local(partial_shares(v, a.spec, mesh, seed), a.spec, mesh, shape=tuple(v.shape))
            else:
                st = shard(v.clone(), a.spec, mesh)
            if backward and (v.is_floating_point() or v.is_complex()):
                st.requires_grad_()
            return st
        if isinstance(a, torch.Tensor):
            return _float_leaf(a, backward)
        return a
    s_fn = fn
    if is_mod:
        s_fn = copy.deepcopy(fn).double()
        for name, p in list(s_fn.named_parameters()):
            spec = (param_specs or {}).get(name, P())
            mod_name, _, attr = name.rpartition(".")
            owner = s_fn.get_submodule(mod_name) if mod_name else s_fn
            setattr(owner, attr, torch.nn.Parameter(shard(p.detach().clone(), spec, mesh)))
    try:
        s_leaves = [sharded_arg(a) for a in args]
        s_kw = {k: sharded_arg(v) for k, v in kwargs.items()}
        s_call = [(x.clone() if inplace and isinstance(x, torch.Tensor) else x) for x in s_leaves]
        out = s_fn(*s_call, **s_kw)
        out_specs = _specs(out)
        got = tree_map(_to_global, out)
    except Exception as e:  # noqa: BLE001
        return Outcome(classify_error(e), "forward", f"{type(e).__name__}: {e}")
    same, err, why = _diff(got, ref, rtol, atol)
    if not same:
        return Outcome("wrong", "forward", why, err, out_specs)

    # ------------------------------------------------------------------ backward
    if not backward:
        return Outcome("pass", "forward", "", err, out_specs)
    ref_flat, _ = tree_flatten(ref)
    got_flat, _ = tree_flatten(got)
    pairs = [(g, r) for g, r in zip(got_flat, ref_flat)
             if isinstance(r, torch.Tensor) and r.requires_grad and r.is_floating_point()]
    if not pairs:
        return Outcome("pass", "forward", "", err, out_specs)
    gen = torch.Generator().manual_seed(seed + 1)
    cots = [torch.randn(r.shape, dtype=r.dtype, generator=gen) for _, r in pairs]
    d_inputs = [x for x in list(d_leaves) + list(d_kw.values()) if isinstance(x, torch.Tensor) and x.requires_grad]
    s_inputs = [x for x in list(s_leaves) + list(s_kw.values()) if isinstance(x, torch.Tensor) and x.requires_grad]
    if is_mod:
        d_inputs += [p for _, p in d_fn.named_parameters()]
        s_inputs += [p for _, p in s_fn.named_parameters()]
    try:
        sum((r * c).sum() for (_, r), c in zip(pairs, cots)).backward()
    except Exception as e:  # noqa: BLE001 - no dense gradient to compare with
        return Outcome("pass", "forward", f"dense backward failed: {type(e).__name__}: {e}", err, out_specs)
    try:
        if not any(g.requires_grad for g, _ in pairs):
            return Outcome("wrong", "backward", "the sharded outputs are not connected to autograd", err, out_specs)
        sum((g * c).sum() for (g, _), c in zip(pairs, cots) if g.requires_grad).backward()
        s_grads = [_to_global(x.grad) if x.grad is not None else None for x in s_inputs]
    except Exception as e:  # noqa: BLE001
        return Outcome(classify_error(e), "backward", f"{type(e).__name__}: {e}", err, out_specs)
    names = [f"input {i}" for i in range(len(s_inputs))]
    if is_mod:
        names[len(names) - len(list(d_fn.parameters())):] = [f"parameter {n}" for n, _ in d_fn.named_parameters()]
    for name, dx, sg in zip(names, d_inputs, s_grads):
        dg = dx.grad
        if dg is None and sg is None:
            continue
        if dg is None:
            dg = torch.zeros_like(dx)
        if sg is None:
            sg = torch.zeros_like(dg)
        same, e2, why = _diff(sg, dg, rtol, atol)
        if not same:
            return Outcome("wrong", "backward", f"gradient of {name}: {why}", e2, out_specs)
        err = max(err, e2)
    return Outcome("pass", "backward", "", err, out_specs)


def assert_sharded_equal(fn: Callable, *args: Any, mesh: Mesh | None = None, param_specs: dict[str, P] | None = None,
                         backward: bool = True, inplace: bool = False, allow_refusal: bool = False,
                         rtol: float = 1e-7, atol: float = 1e-9, seed: int = 0, **kwargs: Any) -> Outcome:
    """Assert that ``fn(*args, **kwargs)`` on sharded operands equals the dense float64 run, values
    and gradients (see :func:`compare_sharded`). Returns the :class:`Outcome`.

    A refusal (``ShardingError``) fails the assertion unless ``allow_refusal=True``: use that for
    properties over layouts where refusing is a legitimate answer, so that only *wrong* results
    (and crashes) fail. A silent wrong answer always fails.
    """
    out = compare_sharded(fn, args, kwargs, mesh=mesh, param_specs=param_specs, backward=backward,
                          inplace=inplace, rtol=rtol, atol=atol, seed=seed)
    if out.status == "pass" or (out.status == "refuse" and allow_refusal):
        return out
    desc = ", ".join(f"Sharded({tuple(a.value.shape)}, {a.spec})" if isinstance(a, Sharded) else
                     (f"Tensor{tuple(a.shape)}" if isinstance(a, torch.Tensor) else repr(a)) for a in args)
    raise AssertionError(f"sharded != dense ({out.status} at {out.stage}) for {getattr(fn, '__name__', fn)!s}"
                         f"({desc}) on {mesh or current_mesh(None)}: {out.detail}")
