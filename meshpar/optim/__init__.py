"""Data parallelism and ZeRO as specs on the data axis; mixed precision; gradient clipping.

``mp.optim.zero(torch.optim.AdamW(model.parameters()), mesh, stage=2)`` — see docs/zero.md.
"""
from .clip import clip_grad_norm_
from .cpu_adamw import CPUAdamW, adamw_step_
from .elementwise import ELEMENTWISE
from .scaler import LossScaler
from .zero import ZeroOptimizer, zero

__all__ = ["CPUAdamW", "adamw_step_", "zero", "ZeroOptimizer", "clip_grad_norm_", "LossScaler", "ELEMENTWISE"]
