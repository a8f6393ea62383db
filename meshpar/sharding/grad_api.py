"""The autograd API on block-graph results (see :mod:`meshpar.sharding.tensor`).

A ShardedTensor computed under autograd keeps its graph on its block (``_lg``), so the calls that
name a tensor to the autograd engine are routed here and given the block:

* ``x.backward(gradient)`` and ``torch.autograd.backward(tensors, grad_tensors, inputs=...)``: the
  block is the root and the gradient's block (in ``x``'s layout, a free slice from a global tensor)
  its seed; a scalar's implicit seed is a block of ones;
* ``torch.autograd.grad(outputs, inputs, grad_outputs)``: likewise, and the gradient of a
  block-graph input comes back as a ShardedTensor in the input's layout;
* ``x.register_hook(hook)``: the hook sees and returns ShardedTensors, run on the block's gradient;
* ``x.retain_grad()``: ``x.grad`` is the block's gradient as a ShardedTensor after the backward;
* ``x.detach_()``: the block leaves the graph.

Calls with no block-graph tensor among their operands go to torch unchanged.
"""
from __future__ import annotations

import copy
import weakref

import torch

from ..errors import ShardingError
from .core import enter, grad_block, wrap
from .dispatch import register
from .tensor import _BLOCK_GRAPH_USE, ShardedTensor

T = torch.Tensor
_DisableTF = torch._C.DisableTorchFunctionSubclass


NON_LEAF_REQUIRES_GRAD = ("you can only change requires_grad flags of leaf variables. If you want to use a computed "
                          "variable in a subgraph that doesn't require differentiation use var_no_grad = var.detach().")


def _bg(x) -> bool:
    return type(x) is ShardedTensor and x._bg


def _as_list(x) -> list:
    if x is None:
        return []
    return [x] if isinstance(x, torch.Tensor) else list(x)


def _seed(t: ShardedTensor, g, i: int) -> torch.Tensor:
    """The block of the gradient ``g`` of output ``t`` (``None``: ones, for a scalar ``t``)."""
    if g is None:
        if t._gshape.numel() != 1:
            raise RuntimeError("grad can be implicitly created only for scalar outputs")
        return torch.ones_like(t._local)
    if tuple(g.shape) != tuple(t._gshape):
        raise RuntimeError(f"Mismatch in shape: grad_output[{i}] has a shape of {torch.Size(g.shape)} and "
                           f"output[{i}] has a shape of {t._gshape}.")
    return grad_block(g, t.spec, t.mesh, t._gshape)


def _roots(tensors, grads) -> tuple[list, list]:
    """Outputs as plain tensors for the engine (a block-graph result's block; any other ShardedTensor's
    block entered into its wrapper's graph), their gradients as blocks.

    No ShardedTensor reaches ``torch.autograd`` itself: it would route the call back here, and calling
    it with ``__torch_function__`` disabled would leave it disabled for the whole backward (checkpoint
    recomputation and hooks would then bypass the dispatcher)."""
    ts, gs = _as_list(tensors), _as_list(grads) if grads is not None else None
    if gs is not None and len(gs) != len(ts):
        raise RuntimeError(f"got {len(gs)} gradients for {len(ts)} tensors")
    out_t, out_g = [], []
    for i, t in enumerate(ts):
        g = None if gs is None else gs[i]
        if _bg(t):
            out_t.append(t._lg)
            out_g.append(_seed(t, g, i))
        elif isinstance(t, ShardedTensor):
            out_t.append(enter(t))
            out_g.append(_seed(t, g, i))
        else:
            out_t.append(t)
            out_g.append(g)
    return out_t, out_g


@register(T.backward)
def _tensor_backward(func, args, kwargs):
    return _backward_of_tensor(*args, **kwargs)


def _backward_of_tensor(self, gradient=None, retain_graph=None, create_graph=False, inputs=None):
    return torch.autograd.backward(self, gradient, retain_graph, create_graph, inputs=inputs)


@register(torch.autograd.backward)
def _autograd_backward(func, args, kwargs):
    return _backward(*args, **kwargs)


def _backward(tensors, grad_tensors=None, retain_graph=None, create_graph=False, grad_variables=None, inputs=None):
    grads = grad_tensors if grad_tensors is not None else grad_variables
    tensors, seeds = _roots(tensors, grads)
    inputs = _as_list(inputs)
    torch.autograd.backward(tensors, seeds, retain_graph, create_graph, inputs=[_input(x) for x in inputs] or None)
    for x in inputs:  # a non-leaf named in ``inputs`` gets its gradient in ``.grad``, as in torch
        if _bg(x):
            g = x._lg.grad
            x.__dict__["_retained"] = None if g is None else ShardedTensor(g, x.spec.reduced(), x.mesh, x._gshape)


@register(torch.autograd.grad)
def _autograd_grad(func, args, kwargs):
    return _grad(*args, **kwargs)


def _grad(outputs, inputs, grad_outputs=None, retain_graph=None, create_graph=False, only_inputs=True,
          allow_unused=None, is_grads_batched=False, materialize_grads=False):
    if is_grads_batched and any(_bg(t) for t in _as_list(outputs)):
        raise ShardingError("torch.autograd.grad(is_grads_batched=True) on a ShardedTensor output is not supported; "
                            "loop over the gradients instead")
    outputs, seeds = _roots(outputs, grad_outputs)
    inputs = _as_list(inputs)
    check_no_hidden_use(outputs)
    extra = {k: v for k, v in (("allow_unused", allow_unused), ("materialize_grads", materialize_grads)) if v}
    res = torch.autograd.grad(outputs, [_input(x) for x in inputs], seeds, retain_graph, create_graph, only_inputs,
                              **extra)
    out = []
    for x, g in zip(inputs, res):
        if _bg(x) and g is not None:
            g = wrap(g, x.spec.reduced(), x.mesh, x._gshape)
        out.append(g)
    return tuple(out)


def _input(x):
    """An input for the engine: a block-graph result's block, another ShardedTensor's gradient edge."""
    if _bg(x):
        return x._lg
    if isinstance(x, ShardedTensor):
        with _DisableTF():
            return torch.autograd.graph.get_gradient_edge(x)
    return x


def check_no_hidden_use(outputs) -> None:
    """Raise if the graph behind ``outputs`` has an edge to a block-graph wrapper itself (code the dispatcher
    did not see recorded it); ``torch.autograd.grad`` would drop the gradient that flows there (a backward
    raises through the sentinel instead)."""
    seen: set = set()
    stack = [t.grad_fn for t in outputs if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if var is not None and type(var) is ShardedTensor and var._bg:
            raise ShardingError(_BLOCK_GRAPH_USE)
        stack.extend(n for n, _ in node.next_functions)


@register(T.register_hook)
def _register_hook(func, args, kwargs):
    x = args[0]
    if not _bg(x):
        return NotImplemented
    hook = args[1] if len(args) > 1 else kwargs["hook"]
    spec, mesh, shape = x.spec, x.mesh, x._gshape

    def on_block(g: torch.Tensor):
        r = hook(wrap(g, spec.reduced(), mesh, shape))
        return None if r is None else grad_block(r, spec, mesh, shape)
    return x._lg.register_hook(on_block)


@register(T.retain_grad)
def _retain_grad(func, args, kwargs):
    x = args[0]
    if not _bg(x):
        return NotImplemented
    if "_retained" in x.__dict__:
        return None
    x.__dict__["_retained"] = None
    ref = weakref.ref(x)
    spec, mesh, shape = x.spec.reduced(), x.mesh, x._gshape

    def keep(g: torch.Tensor):
        t = ref()
        if t is not None:
            prev = t.__dict__.get("_retained")
            val = g.detach().clone() if prev is None else prev._local + g.detach()
            t.__dict__["_retained"] = ShardedTensor(val, spec, mesh, shape)
    x._lg.register_hook(keep)
    return None


@register(T.detach_, torch.detach_)
def _detach_(func, args, kwargs):
    x = args[0]
    if not _bg(x):
        return NotImplemented
    x._lg = None
    x._bg = False
    with _DisableTF():
        x.grad = None
        x.requires_grad_(False)
    return x


@register(T.requires_grad.__set__)
def _set_requires_grad(func, args, kwargs):
    x, flag = args
    if _bg(x):
        if not flag:  # torch's rule for a computed (non-leaf) tensor
            raise RuntimeError(NON_LEAF_REQUIRES_GRAD)
        return None
    if isinstance(x, ShardedTensor):
        x._ent = None  # its entered block (core.enter) follows requires_grad
    return NotImplemented


@register(T.__deepcopy__)
def _deepcopy(func, args, kwargs):
    """``copy.deepcopy`` of a ShardedTensor: a copy of its block in the same layout on the same mesh (the mesh
    and its process groups are shared, not copied), with ``requires_grad``, a copy of ``.grad`` and the user's
    attributes (an ``nn.Parameter``'s flag, deferral marks); the dispatcher's caches are not carried over
    (torch's own deepcopy copied them, and failed on the cached autograd-connected block)."""
    x, memo = args[0], (args[1] if len(args) > 1 else kwargs.get("memo", {}))
    if id(x) in memo:
        return memo[id(x)]
    with _DisableTF():
        computed = x.grad_fn is not None
    if _bg(x) or computed:  # torch's rule for a computed (non-leaf) tensor
        raise RuntimeError("Only Tensors created explicitly by the user (graph leaves) support the deepcopy protocol "
                           "at the moment; a ShardedTensor computed under autograd is not one. Deep-copy "
                           "x.detach() instead.")
    with torch.no_grad():
        new = ShardedTensor(x._local.clone(), x.spec, x.mesh, x._gshape)
    memo[id(x)] = new
    for k, v in x.__dict__.items():
        if k not in _NOT_COPIED:
            setattr(new, k, copy.deepcopy(v, memo))
    with _DisableTF():
        rg, grad = x.requires_grad, x.grad
    if rg:
        new.requires_grad_(True)
    if grad is not None:
        new.grad = copy.deepcopy(grad, memo)
    return new


# the dispatcher's per-tensor caches and hook marks (meshpar.sharding.core.enter, views, keep_grad_layout)
_NOT_COPIED = frozenset({"_ent", "_lg", "_lgv", "_bg", "_view", "_retained", "_meshpar_grad_hook"})
