"""Which torch optimizers ZeRO can shard: those whose step is elementwise.

ZeRO flattens parameters into buckets and gives each data rank a contiguous slice that cuts
through parameters. That is only correct when the update of every element depends on that
element's own gradient and state (plus scalar hyper-parameters and step counts).
"""
from __future__ import annotations

import torch

ELEMENTWISE: tuple[str, ...] = ("SGD", "Adam", "AdamW", "Adagrad", "Adamax", "NAdam", "RAdam", "RMSprop",
                                "Adadelta", "ASGD")
"""torch.optim classes with an elementwise step (state tensors have the parameter's shape, or are scalars)."""

_WHY = {
    "LBFGS": "it needs a closure and keeps global line-search state over all parameters",
    "SparseAdam": "it needs sparse gradients",
    "Adafactor": "its second moment is factored into row and column statistics of each matrix",
    "Muon": "it orthogonalizes each whole weight matrix",
}


def check_elementwise(optimizer: torch.optim.Optimizer) -> None:
    """Raise a ValueError naming the optimizer when its step is not known to be elementwise."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"meshpar.optim.zero wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
    cls = type(optimizer)
    names = {c.__name__ for c in cls.__mro__ if c.__module__.startswith("torch.optim")}
    ok = [n for n in ELEMENTWISE if n in names]
    if not ok:
        why = _WHY.get(cls.__name__, "its step is not known to be elementwise")
        raise ValueError(
            f"meshpar.optim.zero: optimizer {cls.__name__} is unsupported: {why}. ZeRO shards flat buckets "
            f"of parameters over the data axis, which needs an elementwise step. Supported: "
            f"{', '.join(ELEMENTWISE)}.")
    if any(len(s) for s in optimizer.state.values()):
        raise ValueError("meshpar.optim.zero: wrap the optimizer before its first step (it already has state)")
