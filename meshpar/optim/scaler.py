"""Dynamic loss scaling for fp16 (the overflow decision is agreed by the caller across ranks)."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class LossScaler:
    """Multiply the loss by ``scale``; on overflow skip the step and multiply ``scale`` by ``backoff``;
    after ``growth_interval`` clean steps multiply it by ``growth``.

    The object holds plain floats only. The caller (``ZeroOptimizer``) all-reduces the found-inf
    flag over every mesh axis first, so every rank calls :meth:`update` with the same value.
    """

    scale: float = 2.0 ** 16
    growth: float = 2.0
    backoff: float = 0.5
    growth_interval: int = 2000
    min_scale: float = 1.0
    good_steps: int = 0
    skipped: int = 0

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.scale = max(self.min_scale, self.scale * self.backoff)
            self.good_steps = 0
            self.skipped += 1
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= self.growth
            self.good_steps = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, sd: dict) -> None:
        for k, v in sd.items():
            setattr(self, k, v)
