"""Reference models written functionally (a params dict plus pure functions) and their parallel plans;
plan tables for :func:`meshpar.parallel.parallelize` (:func:`parallel_plan`)."""
from .gpt import GPT, GPTConfig, embed, forward, generate, head, init_params, layer, loss_fn, param_shapes
from .gpt_pipeline import GPTBlock, pipeline_blocks
from .plans import MODES, TABLES, Layouts, Plan, Style, make_plan, padded_sizes, parallel_plan, place_batch, shard_params, unpad

__all__ = ["GPT", "GPTConfig", "GPTBlock", "embed", "layer", "head", "forward", "generate", "init_params", "loss_fn",
           "param_shapes", "pipeline_blocks", "MODES", "Plan",
           "make_plan", "padded_sizes", "shard_params", "unpad", "TABLES", "Layouts", "Style", "parallel_plan", "place_batch"]
