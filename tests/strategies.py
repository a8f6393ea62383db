"""Re-export of :mod:`meshpar.testing.strategies` (older tests import ``strategies`` directly)."""
from meshpar.testing.strategies import *  # noqa: F401,F403
from meshpar.testing.strategies import MESHES, SMALL_MESHES, mesh_spec_shape, spec_for  # noqa: F401
