"""Data parallelism × SUMMA 2D on 8 ranks: mesh (data=2, x=2, y=2), x P(("data", "x"), None, "y") @ w P("x", "y").
Algorithmically the same as 2.5D: the data axis is one more split of the batch.

    torchrun --nproc-per-node 8 examples/tensor_parallel/data_x_summa.py
"""
import meshpar as mp
from _common import init, linear_check, report

init()
mesh = mp.Mesh((2, 2, 2), ("data", "x", "y"))
y, err = linear_check(mesh, mp.P(("data", "x"), None, "y"), mp.P("x", "y"), mp.P("y"))
report("data x SUMMA 2D", y, err)
