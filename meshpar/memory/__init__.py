"""Memory: per-rank accounting of model states (``memory_report``)."""
from .report import MemoryReport, memory_report

__all__ = ["MemoryReport", "memory_report"]
