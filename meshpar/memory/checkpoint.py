"""Activation checkpointing applied from outside the model (``torch.utils.checkpoint``, non-reentrant).

::

    meshpar.memory.checkpoint_activations(model, policy="block", blocks="h.*")

* ``"none"``: nothing is recomputed (undoes an earlier call).
* ``"block"``: each matching module keeps only its inputs; its forward is recomputed in the backward.
* ``"selective"``: inside each matching module, the outputs of the matrix products and attention
  (``mm``, ``addmm``, ``bmm``, SDPA kernels) are kept and everything else (norms, activations,
  pointwise ops) is recomputed: most of the memory saving of ``"block"`` at a fraction of its
  recompute cost (Korthikanti et al., 2022).

The model code is untouched: the module's ``forward`` is replaced on the instance, so hooks (the
chunk manager's, ``parallelize``'s) still run around it. Recomputation runs the same ops on the
same inputs, so results and gradients equal those without checkpointing (dropout included: the
RNG state is restored, and meshpar's dropout masks are keyed by seed and position).
"""
from __future__ import annotations

import fnmatch
import functools
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

POLICIES = ("none", "block", "selective")

_SAVE_OPS = ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu")


def _save_policy():
    from torch.utils.checkpoint import CheckpointPolicy
    aten = torch.ops.aten
    save = {getattr(aten, n).default for n in _SAVE_OPS if hasattr(aten, n)}

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE
    return policy


def _context_fn():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts
    return create_selective_checkpoint_contexts(_save_policy())


def _checkpointed(orig: Callable, selective: bool, *args, **kwargs):
    if not torch.is_grad_enabled():
        return orig(*args, **kwargs)
    extra = {"context_fn": _context_fn} if selective else {}
    return checkpoint(orig, *args, use_reentrant=False, **extra, **kwargs)


def checkpoint_activations(model: nn.Module, policy: str = "block",
                           blocks: str | Callable[[str, nn.Module], bool] = "*") -> list[str]:
    """Checkpoint the activations of ``model``'s ``blocks``.

    Args:
        policy: ``"none"``, ``"block"`` or ``"selective"`` (module docstring).
        blocks: a glob over module names (``"h.*"`` matches ``h.0``, ``h.1``...; only modules whose
            name has as many dots as the pattern, so ``h.*`` does not also match ``h.0.attn``), or
            a predicate ``f(name, module)``.
    Returns:
        The names of the modules now checkpointed (empty for ``"none"``).
    Raises:
        ValueError: unknown policy, or ``blocks`` matches nothing.
    """
    if policy not in POLICIES:
        raise ValueError(f"activation checkpoint policy must be one of {POLICIES}, got {policy!r}")
    if isinstance(blocks, str):
        pat = blocks
        match = lambda n, m: bool(n) and n.count(".") == pat.count(".") and fnmatch.fnmatchcase(n, pat)  # noqa: E731
    else:
        match = blocks
    names = []
    targets = [(n, m) for n, m in model.named_modules() if match(n, m)]
    if not targets and policy != "none":
        raise ValueError(f"checkpoint_activations: no module of {type(model).__name__} matches blocks={blocks!r}")
    for n, m in model.named_modules():
        orig = m.__dict__.pop("_meshpar_ckpt_orig", None)
        if orig is not None:            # undo an earlier call
            m.__dict__.pop("forward", None)
    if policy == "none":
        return []
    for n, m in targets:
        orig = m.forward
        m._meshpar_ckpt_orig = orig
        m.forward = functools.partial(_checkpointed, orig, policy == "selective")
        names.append(n)
    return names
