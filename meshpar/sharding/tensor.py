"""ShardedTensor: a ``torch.Tensor`` subclass holding this rank's block of a global tensor.

``.shape``/``.size()``/``.ndim`` report the **global** shape (as JAX and DTensor do); ``.spec``
and ``.mesh`` say how it is laid out; ``._local`` is the raw block and ``.local`` the block
connected to autograd.

Two entry points route torch calls:

* ``__torch_function__`` (Python level) goes to the rule registry in
  :mod:`meshpar.sharding.dispatch`: each rule picks the distributed algorithm and the output
  spec. This is where every op with communication lives.
* ``__torch_dispatch__`` (below autograd) only serves calls torch makes internally on the
  wrapper — the autograd engine seeding ``ones_like``, accumulating ``.grad``, optimizers'
  in-place updates — and only for *local-equivalent* ops: ops that act blockwise on operands
  of identical layout. Anything else raises a ShardingError naming the op and the specs.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..mesh import Mesh
from .spec import P


class ShardedTensor(torch.Tensor):
    """A block of a global tensor laid out by ``spec`` over ``mesh``.

    Attributes:
        spec: the :class:`P` layout.
        mesh: the :class:`~meshpar.mesh.Mesh`.
        _local: this rank's block, a plain tensor of shape ``local_shape(shape, spec, mesh)``.
        _gshape: the global shape, as a ``torch.Size``.
    """

    _local: torch.Tensor
    spec: P
    mesh: Mesh
    _gshape: torch.Size

    __slots__ = ()

    @staticmethod
    def __new__(cls, local: torch.Tensor, spec: P, mesh: Mesh, shape: Sequence[int], requires_grad: bool = False):
        r = torch.Tensor._make_wrapper_subclass(
            cls, tuple(shape), dtype=local.dtype, device=local.device, requires_grad=requires_grad)
        r._local = local
        r.spec = spec
        r.mesh = mesh
        r._gshape = shape if type(shape) is torch.Size else torch.Size(shape)
        return r

    def __init__(self, *args, **kwargs):  # everything happens in __new__
        pass

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return _HANDLER[0](func, args, kwargs or {})

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        from .fallback import handle_dispatch
        return handle_dispatch(func, args, kwargs or {})

    @property
    def local(self) -> torch.Tensor:
        """This rank's block as a plain tensor, connected to autograd."""
        from .core import enter
        return enter(self)

    def __reduce_ex__(self, proto):
        raise TypeError("a ShardedTensor cannot be pickled; use meshpar.unshard(x) or torch.distributed.checkpoint")

    def __repr__(self, *, tensor_contents=None) -> str:  # noqa: D401
        grad = ", requires_grad=True" if self.requires_grad else ""
        return (f"ShardedTensor(shape={tuple(self._gshape)}, spec={self.spec}, mesh={self.mesh}, "
                f"dtype={self.dtype}{grad}, local={self._local!r})")


# filled by meshpar.sharding.dispatch at import (breaks the import cycle tensor <-> dispatch)
_HANDLER: list = [None]


def is_sharded(x) -> bool:
    return isinstance(x, ShardedTensor)
