"""Differential test of meshpar (and DTensor) against dense torch over torch's OpInfo database.

For every OpInfo with float64 samples and every operand kind (:data:`KINDS`):

* ``split``: the first tensor of the sample split on dim 0 over the mesh axis, the others replicated
  (meshpar ``P("x")`` / ``P()``; DTensor ``Shard(0)`` / ``Replicate()``);
* ``replicated``: every tensor replicated;
* ``partial``: the first tensor a partial sum over the axis (meshpar ``P(unreduced=("x",))``;
  DTensor ``Partial()``), built from exact dyadic shares (:func:`~meshpar.testing.partial_shares`);
  the others replicated,

the op runs on the laid-out operands and, on every rank, the global result is compared with the
dense op on the same float64 sample, forward and (where the op supports autograd) the gradient
of every input that requires one, through a random cotangent. Each sample is run twice on fresh
operands, first under ``torch.no_grad()`` (values), then with autograd on (values and gradients),
so that anything the first call memoises is replayed by the second (:func:`_run_sample`). A sample is ``pass``, ``refuse``
(meshpar raised a ShardingError or a meshpar NotImplementedError; for DTensor a
NotImplementedError or an error naming its sharding propagation), ``wrong`` (numbers, shapes or
dtypes differ, or the result is not connected to autograd) or ``crash`` (any other exception).
An (op, kind) takes the worst status of its first ``max_samples`` applicable samples
(crash > wrong > refuse > pass); ops whose dense result is random, or with no applicable
sample, are not attempted.

:func:`run_ops` is the per-rank engine (call it on every rank of a 1-D mesh, e.g. through
:class:`~meshpar.testing.WorkerPool`); ``bench/opinfo_coverage.py`` runs the whole database and
``tests/test_opinfo.py`` a quick slice.
"""
from __future__ import annotations

import time
import traceback
import zlib
from typing import Any, Iterable, Sequence

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ..errors import ShardingError
from ..mesh import Mesh
from ..sharding import P, ShardedTensor, from_local, shard, unshard
from .compare import _diff, classify_error, partial_shares, splittable

KINDS = ("split", "replicated", "partial")
SYSTEMS = ("meshpar", "dtensor")
STATUSES = ("pass", "refuse", "wrong", "crash")
_WORST = {"pass": 0, "refuse": 1, "wrong": 2, "crash": 3}

# the quick CI slice: everyday ops (OpInfo names, variant after a dot where needed)
EVERYDAY = (
    "add", "sub", "mul", "div.no_rounding_mode", "neg", "abs", "exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid",
    "pow", "maximum", "minimum", "where", "clamp", "sum", "mean", "amax", "var", "std", "softmax", "log_softmax",
    "nn.functional.relu", "nn.functional.gelu", "nn.functional.silu", "nn.functional.dropout", "nn.functional.layer_norm",
    "nn.functional.linear", "nn.functional.mse_loss", "nn.functional.cross_entropy", "matmul", "mm", "bmm",
    "transpose", "permute", "reshape", "view", "unsqueeze", "squeeze", "cat", "stack", "flatten",
    "cumsum", "argmax", "tril", "flip", "index_select", "narrow",
)


def load_ops(names: Iterable[str] | None = None) -> list:
    """OpInfos of ``torch``'s op_db with float64 CPU samples; ``names`` filters by :func:`op_key`."""
    from torch.testing._internal.common_methods_invocations import op_db
    ops = [o for o in op_db if torch.float64 in o.supported_dtypes("cpu")]
    if names is None:
        return ops
    want = set(names)
    picked = [o for o in ops if op_key(o) in want or (o.name in want and not o.variant_test_name)]
    missing = want - {op_key(o) for o in picked} - {o.name for o in picked}
    if missing:
        raise KeyError(f"not in op_db with float64 samples: {sorted(missing)}")
    return picked


def op_key(op) -> str:
    """``name`` or ``name.variant`` of an OpInfo."""
    return op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")


def _seed(key: str) -> int:
    return zlib.crc32(key.encode()) & 0x7FFFFFFF


def _samples(op, limit: int = 40):
    """The op's float64 samples, lazily (at most ``limit``), from a seed fixed by the op's key."""
    torch.manual_seed(_seed(op_key(op)))
    for i, s in enumerate(op.sample_inputs("cpu", torch.float64, requires_grad=op.supports_autograd)):
        if i >= limit:
            return
        yield s


def _first_tensor_index(flat) -> int | None:
    for i, t in enumerate(flat):
        if isinstance(t, torch.Tensor):
            return i
    return None


def _applicable(t: torch.Tensor, kind: str, n: int) -> bool:
    if kind == "split":
        return t.ndim >= 1 and t.shape[0] >= n and t.shape[0] % n == 0
    if kind == "partial":
        return t.dtype == torch.float64
    return True


def _dtensor_error(e: BaseException) -> str:
    if isinstance(e, NotImplementedError):
        return "refuse"
    msg = str(e)
    if any(w in msg for w in ("sharding strategy", "Sharding propagation", "sharding propagation", "DTensor",
                              "not supported", "placement")):
        return "refuse"
    return "crash"


def _call(op, flat, spec):
    inp, args, kwargs = tree_unflatten(flat, spec)
    return op(inp, *args, **kwargs)


_RANDOM_WORDS = ("bernoulli", "cauchy", "exponential", "geometric", "log_normal", "normal", "uniform", "multinomial",
                 "rand", "dropout", "rrelu",
                 # uninitialised memory (torch.empty and friends): no value to compare, and a per-rank
                 # randomness probe could disagree between ranks (one rank skips, the other waits)
                 "empty")


def is_random_op(op) -> bool:
    """Ops that draw random numbers (OpInfo seeds them, so they look deterministic to a dense rerun), or
    return uninitialised memory (``empty*``)."""
    return any(w in op.name for w in _RANDOM_WORDS) and op.name not in ("nn.functional.normalize", "masked.normalize", "native_dropout_backward",
                                                                        "signal.windows.exponential")


def _is_random(op, flat, spec) -> bool:
    """True when the sample's dense result depends on the RNG. OpInfo wraps some random ops (dropout
    inside ``multi_head_attention_forward``, ...) in ``wrapper_set_seed``, which reseeds torch's
    global generator to 42: that wrapper is bypassed here so their randomness shows (meshpar draws
    from its mesh-shared generator, whose stream is not torch's global one)."""
    import contextlib
    import torch.testing._internal.common_methods_invocations as cmi
    outs = []
    for s in (1, 2):
        torch.manual_seed(s)
        with torch.no_grad(), contextlib.ExitStack() as stack:
            if hasattr(cmi, "wrapper_set_seed"):
                orig = cmi.wrapper_set_seed
                cmi.wrapper_set_seed = lambda fn, *a, **k: fn(*a, **k)
                stack.callback(setattr, cmi, "wrapper_set_seed", orig)
            o = _call(op, [t.detach().clone() if isinstance(t, torch.Tensor) else t for t in flat], spec)
        outs.append(o)
    same, _, _ = _diff(outs[0], outs[1], 0.0, 0.0)
    return not same


class _System:
    """How one system lays operands out and brings results back."""

    def __init__(self, name: str, mesh: Mesh, dmesh=None):
        self.name, self.mesh, self.dmesh = name, mesh, dmesh

    def layout(self, t: torch.Tensor, kind: str, seed: int):
        """The laid-out leaf for tensor ``t`` (``kind`` in split/replicated/partial)."""
        v = t.detach().clone()
        if self.name == "meshpar":
            if kind == "split":
                st = shard(v, P("x"), self.mesh)
            elif kind == "partial":
                spec = P(unreduced=("x",))
                st = from_local(partial_shares(v, spec, self.mesh, seed), spec, self.mesh, shape=tuple(v.shape))
            else:
                st = shard(v, P(), self.mesh)
        else:
            from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
            if kind == "split":
                st = distribute_tensor(v, self.dmesh, [Shard(0)])
            elif kind == "partial":
                share = partial_shares(v, P(unreduced=("x",)), self.mesh, seed)
                st = DTensor.from_local(share, self.dmesh, [Partial()], run_check=False)
            else:
                st = distribute_tensor(v, self.dmesh, [Replicate()])
        if t.requires_grad:
            st.requires_grad_()
        return st

    def to_global(self, x):
        if isinstance(x, ShardedTensor):
            return unshard(x)
        if self.name == "dtensor":
            from torch.distributed.tensor import DTensor
            if isinstance(x, DTensor):
                return x.full_tensor()
        return x

    def classify(self, e: BaseException) -> str:
        return classify_error(e) if self.name == "meshpar" else _dtensor_error(e)


def _lay_out(system: _System, kind: str, flat, first: int, seed: int) -> list:
    """Fresh laid-out leaves for one call: the first tensor as ``kind``, the other tensors replicated."""
    leaves = []
    for i, t in enumerate(flat):
        if isinstance(t, torch.Tensor):
            lay = kind if i == first else "replicated"
            if lay == "partial" and t.dtype != torch.float64:
                lay = "replicated"
            leaves.append(system.layout(t, lay, seed))
        else:
            leaves.append(t)
    return leaves


def _run_sample(op, system: _System, kind: str, flat, spec, first: int, ref, ref_grads, cots, process, seed: int,
                rtol: float, atol: float) -> tuple[str, str]:
    """(status, detail) of one sample on one system and kind: the worst of two calls on fresh operands.

    The op runs twice, compared with the dense result each time: first under ``torch.no_grad()``
    (forward values), then with autograd on (forward values and every input gradient). The no-grad
    call goes first so that whatever it memoises or caches (meshpar's no-grad executors, the
    below-autograd executors shared by both modes, plans) is in place when the grad call runs: a
    stale entry replayed in the second call shows as a wrong value or gradient, as the no-grad
    Zigzag memo bug did (a later call reused an executor that was wrong for its layout).
    """
    first_call = _call_once(op, system, kind, flat, spec, first, ref, None, None, process, seed, rtol, atol, grad=False)
    second_call = _call_once(op, system, kind, flat, spec, first, ref, ref_grads, cots, process, seed, rtol, atol,
                             grad=True)
    if _WORST[first_call[0]] > _WORST[second_call[0]]:
        return first_call[0], f"no_grad call: {first_call[1]}"
    return second_call


def _call_once(op, system: _System, kind: str, flat, spec, first: int, ref, ref_grads, cots, process, seed: int,
               rtol: float, atol: float, grad: bool) -> tuple[str, str]:
    """(status, detail) of one call of the op on freshly laid-out operands (``grad``: autograd on, and
    the gradients are compared too when ``cots`` is given)."""
    try:
        leaves = _lay_out(system, kind, flat, first, seed)
    except Exception as e:  # noqa: BLE001 - laying the operand out is part of the system
        return system.classify(e), f"layout: {type(e).__name__}: {e}"
    try:
        torch.manual_seed(seed)
        with torch.set_grad_enabled(grad):
            out = _call(op, leaves, spec)
            got = tree_map(system.to_global, out)
    except Exception as e:  # noqa: BLE001
        return system.classify(e), f"forward: {type(e).__name__}: {_short(e)}"
    same, err, why = _diff(got, ref, rtol, atol)
    if not same:
        return "wrong", f"forward: {why}"
    if not grad or cots is None:
        return "pass", ""
    try:
        proc = tree_flatten(process(got))[0]
        pairs = [(g, c) for g, c in zip([p for p in proc if isinstance(p, torch.Tensor)], cots) if c is not None]
        if not any(isinstance(g, torch.Tensor) and g.requires_grad for g, _ in pairs):
            return "wrong", "backward: the result is not connected to autograd"
        sum((g * c).sum() for g, c in pairs if g.requires_grad).backward()
        grads = [system.to_global(x.grad) if isinstance(x, torch.Tensor) and x.requires_grad else None
                 for x in leaves]
    except Exception as e:  # noqa: BLE001
        return system.classify(e), f"backward: {type(e).__name__}: {_short(e)}"
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        if r is None and g is None:
            continue
        r = r if r is not None else torch.zeros_like(flat[i])
        g = g if g is not None else torch.zeros_like(r)
        same, _, why = _diff(g, r, rtol, atol)
        if not same:
            return "wrong", f"backward: gradient of tensor {i}: {why}"
    return "pass", ""


def _short(e: BaseException, n: int = 300) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else "")[:n]


def run_op(op, mesh: Mesh, kinds: Sequence[str] = KINDS, systems: Sequence[str] = SYSTEMS, max_samples: int = 2,
           rtol: float = 1e-7, atol: float = 1e-7, dmesh=None) -> dict[str, Any]:
    """Run one OpInfo on every kind and system; return ``{"op", "results": {system: {kind: {...}}}, "seconds"}``.

    Each leaf result is ``{"status", "samples", "detail"}``, or ``{"status": "n/a", "why"}`` when no
    sample applies.
    """
    t0 = time.perf_counter()
    key = op_key(op)
    n = mesh.size("x")
    res: dict[str, dict] = {s: {} for s in systems}
    if is_random_op(op):
        return {"op": key, "skipped": "random op (not compared with dense)", "results": res,
                "seconds": time.perf_counter() - t0}
    samples = _samples(op)
    syss = [_System(s, mesh, dmesh) for s in systems]
    counts = {(s, k): 0 for s in systems for k in kinds}
    for sidx, sample in enumerate(samples):
        if all(c >= max_samples for c in counts.values()):
            break
        if not isinstance(sample.input, torch.Tensor) and not (
                isinstance(sample.input, (list, tuple)) and sample.input and isinstance(sample.input[0], torch.Tensor)):
            continue
        flat, spec = tree_flatten((sample.input, sample.args, sample.kwargs))
        first = _first_tensor_index(flat)
        if first is None:
            continue
        todo = [k for k in kinds if _applicable(flat[first], k, n) and any(counts[(s, k)] < max_samples for s in systems)]
        if not todo:
            continue
        # ---------------------------------------------------------------- dense reference
        seed = _seed(f"{key}/{sidx}")
        try:
            if _is_random(op, flat, spec):
                return {"op": key, "skipped": "random op (dense results differ between seeds)", "results": res,
                        "seconds": time.perf_counter() - t0}
        except Exception:  # noqa: BLE001 - a sample the dense op rejects
            continue
        for kind in todo:
            d_flat = [t.detach().clone() if isinstance(t, torch.Tensor) else t for t in flat]
            if kind == "partial":
                d_flat[first] = splittable(d_flat[first])
            d_flat = [t.requires_grad_(o.requires_grad) if isinstance(t, torch.Tensor) else t
                      for t, o in zip(d_flat, flat)]
            torch.manual_seed(seed)
            ref = _call(op, d_flat, spec)
            ref_grads, cots = [None] * len(flat), None
            if op.supports_autograd and any(isinstance(t, torch.Tensor) and t.requires_grad for t in d_flat):
                proc = [p for p in tree_flatten(sample.output_process_fn_grad(ref))[0] if isinstance(p, torch.Tensor)]
                gen = torch.Generator().manual_seed(seed + 1)
                cots = [torch.randn(p.shape, dtype=p.dtype, generator=gen)
                        if p.requires_grad and p.is_floating_point() else None for p in proc]
                if any(c is not None for c in cots):
                    try:
                        sum((p * c).sum() for p, c in zip(proc, cots) if c is not None).backward()
                        ref_grads = [t.grad if isinstance(t, torch.Tensor) and t.requires_grad else None for t in d_flat]
                    except Exception:  # noqa: BLE001 - no dense gradient: compare forward only
                        cots = None
                else:
                    cots = None
            ref = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, ref)
            for system in syss:
                if counts[(system.name, kind)] >= max_samples:
                    continue
                status, detail = _run_sample(op, system, kind, flat, spec, first, ref, ref_grads, cots,
                                             sample.output_process_fn_grad, seed, rtol, atol)
                counts[(system.name, kind)] += 1
                cur = res[system.name].get(kind)
                if cur is None or _WORST[status] > _WORST[cur["status"]]:
                    res[system.name][kind] = {"status": status, "detail": detail, "sample": sidx}
                res[system.name][kind]["samples"] = counts[(system.name, kind)]
    for s in systems:
        for k in kinds:
            res[s].setdefault(k, {"status": "n/a", "why": "no applicable float64 sample"})
    return {"op": key, "results": res, "seconds": time.perf_counter() - t0}


def run_ops(mesh: Mesh, names: Sequence[str] | None = None, kinds: Sequence[str] = KINDS,
            systems: Sequence[str] = SYSTEMS, max_samples: int = 2) -> list[dict]:
    """:func:`run_op` for each op named (all of op_db when None), on this rank; every rank of ``mesh``
    (1-D, axis ``"x"``) must call it with the same arguments. DTensor runs on a DeviceMesh over the
    same ranks (the mesh must span the whole world)."""
    if mesh.names != ("x",):
        raise ShardingError(f"run_ops needs a 1-D mesh with axis 'x', got {mesh}")
    dmesh = None
    if "dtensor" in systems:
        from torch.distributed.device_mesh import DeviceMesh
        dmesh = DeviceMesh("cpu", list(range(mesh.size())))
    out = []
    for op in load_ops(names):
        try:
            rec = _run_op_each_system(op, mesh, kinds, systems, max_samples, dmesh)
        except Exception as e:  # noqa: BLE001 - a harness failure on one op must not hide the others
            rec = {"op": op_key(op), "skipped": f"harness error: {type(e).__name__}: {_short(e)}\n"
                                                f"{traceback.format_exc()[-800:]}", "results": {}}
        out.append(rec)
        if _poisoned(rec):
            # a collective failed (a rank raised where another went on): the group is out of step,
            # so stop here; the caller restarts the processes before running further ops
            rec["poisoned"] = True
            break
    return out


def _run_op_each_system(op, mesh: Mesh, kinds: Sequence[str], systems: Sequence[str], max_samples: int,
                        dmesh) -> dict[str, Any]:
    """:func:`run_op` for one system after the other (same samples, same seeds), merged into one record.

    A system whose collectives desynchronise the ranks (a hang) then cannot take the results of the
    systems run before it down with it: DTensor's ``_batch_norm_with_update`` does so in about one
    run in three (its ranks, whose Python hash seeds differ, issue different collectives), which
    used to be charged to meshpar's later kinds of the same op as well."""
    rec: dict[str, Any] = {"op": op_key(op), "results": {}, "seconds": 0.0}
    for system in systems:
        one = run_op(op, mesh, kinds, (system,), max_samples, dmesh=dmesh)
        rec["seconds"] += one.get("seconds", 0.0)
        if "skipped" in one:  # decided by the dense op alone: the same for every system
            return dict(one, results={s: {} for s in systems}, seconds=rec["seconds"])
        rec["results"][system] = one["results"][system]
        if _poisoned(one):
            break
    return rec


_COMM_FAILURE = ("CollectiveTimeout", "pair closure", "Connection closed", "Connection reset", "timed out",
                 "Timed out")


def _poisoned(record: dict) -> bool:
    """True when a result shows a failed collective: the process group may be out of step after it."""
    for by_kind in record.get("results", {}).values():
        for v in by_kind.values():
            if any(w in v.get("detail", "") for w in _COMM_FAILURE):
                return True
    return False


def merge_ranks(per_rank: Sequence[list[dict]]) -> list[dict]:
    """One record per op from every rank's records: the worst status over ranks (ranks compare
    the same global result, so they should agree; a disagreement is itself reported)."""
    merged = []
    if len({len(p) for p in per_rank}) > 1:  # one rank stopped early (a failed collective): so do all
        n = min(len(p) for p in per_rank)
        per_rank = [list(p[:n - 1]) + [dict(p[n - 1], poisoned=True)] if i == 0 else list(p[:n])
                    for i, p in enumerate(per_rank)]
    for recs in zip(*per_rank):
        base = {"op": recs[0]["op"], "results": {}, "seconds": max(r.get("seconds", 0.0) for r in recs)}
        if any(r.get("poisoned") for r in recs):
            base["poisoned"] = True
        if any("skipped" in r for r in recs):
            base["skipped"] = next(r["skipped"] for r in recs if "skipped" in r)
        for system, by_kind in recs[0].get("results", {}).items():
            base["results"][system] = {}
            for kind in by_kind:
                cands = [r.get("results", {}).get(system, {}).get(kind) or
                         {"status": "crash", "detail": r.get("skipped", "no result on this rank")} for r in recs]
                worst = max(cands, key=lambda c: _WORST.get(c["status"], -1))
                worst = dict(worst)
                if len({c["status"] for c in cands}) > 1:
                    worst["detail"] = f"ranks disagree ({[c['status'] for c in cands]}): " + worst.get("detail", "")
                base["results"][system][kind] = worst
        merged.append(base)
    return merged


def summarize(records: Sequence[dict], systems: Sequence[str] = SYSTEMS, kinds: Sequence[str] = KINDS) -> dict:
    """``{system: {kind: {"attempted", "pass", "refuse", "wrong", "crash"}}}`` over op records."""
    out = {s: {k: {"attempted": 0, **{st: 0 for st in STATUSES}} for k in kinds} for s in systems}
    for r in records:
        for s in systems:
            for k in kinds:
                st = r.get("results", {}).get(s, {}).get(k, {}).get("status")
                if st in STATUSES:
                    out[s][k]["attempted"] += 1
                    out[s][k][st] += 1
    return out


def failures(records: Sequence[dict], system: str = "meshpar", statuses: Sequence[str] = ("wrong", "crash")) -> list:
    """``[(op, kind, status, detail)]`` of the records of ``system`` whose status is in ``statuses``."""
    out = []
    for r in records:
        for k, v in r.get("results", {}).get(system, {}).items():
            if v.get("status") in statuses:
                out.append((r["op"], k, v["status"], v.get("detail", "")))
    return out
