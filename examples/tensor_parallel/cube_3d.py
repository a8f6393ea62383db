"""3D on a 2×2×2 mesh (i, j, k): x P(("i", "j"), None, "k") @ w P("k", ("j", "i")) -> y P(("i", "k"), None, "j").
The next layer's weight P("j", ("k", "i")) maps y back to x's layout (the specs carry the axis roles).

    torchrun --nproc-per-node 8 examples/tensor_parallel/cube_3d.py
"""
import meshpar as mp
from _common import init, linear_check, report

init()
mesh = mp.Mesh((2, 2, 2), ("i", "j", "k"))
y, err = linear_check(mesh, mp.P(("i", "j"), None, "k"), mp.P("k", ("j", "i")), mp.P("j"))
assert y.spec == mp.P(("i", "k"), None, "j")
report("3D layer 1", y, err)
