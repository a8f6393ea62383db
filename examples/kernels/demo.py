"""cuda_ops in a few lines: kernel status, the fused loss head, the CPU AdamW step (runs on CPU in seconds).

    PYTHONPATH=. python examples/kernels/demo.py
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import cuda_ops
from meshpar.ops.fused_loss import fused_linear_cross_entropy
from meshpar.optim import CPUAdamW


def main() -> None:
    for name, st in cuda_ops.build_all().items():
        print(f"{name:>12}: {st.state} ({st.reason})")

    torch.manual_seed(0)
    h = torch.randn(4, 32, 64, dtype=torch.float64, requires_grad=True)  # [B, T, C]
    w = torch.randn(1000, 64, dtype=torch.float64, requires_grad=True)   # [V, C]
    t = torch.randint(0, 1000, (4, 32))
    loss = fused_linear_cross_entropy(h, w, t, chunk_size=16)            # never holds [B*T, V] logits
    loss.backward()
    ref = F.cross_entropy((h @ w.T).reshape(-1, 1000), t.reshape(-1))
    print(f"fused loss {loss.item():.12f}  dense {ref.item():.12f}")

    p = torch.nn.Parameter(torch.randn(1 << 16))
    opt = CPUAdamW([p], lr=1e-3, weight_decay=0.1)
    p.grad = torch.randn_like(p)
    opt.step()
    print("CPUAdamW step done; kernel" if cuda_ops.load("cpu_adamw") else "CPUAdamW step done; torch fallback")


if __name__ == "__main__":
    main()
