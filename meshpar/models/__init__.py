"""meshpar's GPT (a plain ``nn.Module``) and the plan tables that parallelize models from outside
(:func:`parallel_plan` for :func:`meshpar.parallelize`)."""
from .gpt import GPT, GPTConfig
from .gpt_pipeline import pipeline_blocks
from .plans import TABLES, Layouts, Style, parallel_plan, place_batch

__all__ = ["GPT", "GPTConfig", "pipeline_blocks", "TABLES", "Layouts", "Style", "parallel_plan", "place_batch"]
