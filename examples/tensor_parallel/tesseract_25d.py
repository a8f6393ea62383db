"""2.5D (Tesseract) on a 2×2×2 mesh (depth d, SUMMA grid x×y):
x P(("d", "x"), None, "y") @ w P("x", "y") (replicated over d) -> y P(("d", "x"), None, "y").
Each depth slice runs its own SUMMA; dW is all-reduced over d.

    torchrun --nproc-per-node 8 examples/tensor_parallel/tesseract_25d.py
"""
import meshpar as mp
from _common import init, linear_check, report

init()
mesh = mp.Mesh((2, 2, 2), ("d", "x", "y"))
y, err = linear_check(mesh, mp.P(("d", "x"), None, "y"), mp.P("x", "y"), mp.P("y"))
report("2.5D", y, err)
