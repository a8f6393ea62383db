"""Reference models written functionally (a params dict plus pure functions) and their parallel plans."""
from .gpt import GPT, GPTConfig, forward, generate, init_params, loss_fn, param_shapes
from .plans import MODES, Plan, make_plan, padded_sizes, shard_params, unpad

__all__ = ["GPT", "GPTConfig", "forward", "generate", "init_params", "loss_fn", "param_shapes", "MODES", "Plan",
           "make_plan", "padded_sizes", "shard_params", "unpad"]
