"""Turning user blocks (modules or functions) into the per-rank chunk modules of a pipeline."""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
import torch.nn as nn

from ..errors import ShardingError


class FunctionalBlock(nn.Module):
    """A functional block ``fn(params, x) -> y`` with its parameters held as a module.

    ``params`` maps names (``"w"``, ``"b"``...) to tensors; they become ``nn.Parameter`` s (so an
    optimizer over :meth:`parameters` trains them) and are passed to ``fn`` as a dict.
    """

    def __init__(self, fn: Callable[[Mapping[str, torch.Tensor], torch.Tensor], torch.Tensor],
                 params: Mapping[str, torch.Tensor] | None = None):
        super().__init__()
        self.fn = fn
        self.params = nn.ParameterDict({k: v if isinstance(v, nn.Parameter) else nn.Parameter(v)
                                        for k, v in (params or {}).items()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(dict(self.params.items()), x)


class _Lambda(nn.Module):
    """A parameter-free function ``fn(x)`` as a module."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def as_module(block: object, index: int) -> nn.Module:
    """``nn.Module`` as is; ``(fn, params)`` as :class:`FunctionalBlock`; a callable ``fn(x)`` wrapped."""
    if isinstance(block, nn.Module):
        return block
    if isinstance(block, tuple) and len(block) == 2 and callable(block[0]) and isinstance(block[1], Mapping):
        return FunctionalBlock(block[0], block[1])
    if callable(block):
        return _Lambda(block)
    raise ShardingError(
        f"pipeline block {index} is a {type(block).__name__}; give an nn.Module, a function fn(x), "
        f"or a pair (fn, params) for fn(params, x)")


def build_chunk(blocks: Sequence[object], start: int, end: int) -> nn.Sequential:
    """The blocks ``start..end-1`` as one sequential module."""
    return nn.Sequential(*[as_module(blocks[i], i) for i in range(start, end)])
