"""SUMMA 2D on a 2×2 mesh: x P("x", None, "y") @ w P("x", "y") -> y P("x", None, "y").

    torchrun --nproc-per-node 4 examples/tensor_parallel/summa_2d.py
"""
import meshpar as mp
from _common import init, linear_check, report

init()
mesh = mp.Mesh((2, 2), ("x", "y"))
y, err = linear_check(mesh, mp.P("x", None, "y"), mp.P("x", "y"), mp.P("y"))
report("SUMMA 2D", y, err)
