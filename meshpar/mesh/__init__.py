"""Meshes and the one communication layer: collectives addressed by axis name."""
from .mesh import Mesh, current_mesh, normalize_axes
from .counter import CommCounter
from . import collectives, autograd
from .autograd import psum, pmean, pmax, pmin, pvary, all_gather, psum_scatter, all_to_all, ppermute, axis_index

__all__ = ["Mesh", "current_mesh", "normalize_axes", "CommCounter", "collectives", "autograd",
           "psum", "pmean", "pmax", "pmin", "pvary", "all_gather", "psum_scatter", "all_to_all", "ppermute", "axis_index"]
