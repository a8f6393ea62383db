"""Training system: config files, launch, initialize/Engine, Trainer + hooks, data, checkpoints, CLI."""
from .batch import check_replicas, place_batch
from .checkpoint import (Block, export_safetensors, latest_checkpoint, load_checkpoint, load_full,
                         save_checkpoint)
from .config import Config, ConfigError, load_config
from .data import ShardedSampler, TokenDataset, get_dataloader
from .engine import Engine, initialize, model_plan, parallelize_model
from .hooks import CheckpointHook, Hook, LRSchedulerHook, MetricLoggerHook, ThroughputHook
from .launch import Context, context_for, current_context, launch, launch_from_slurm, launch_from_torch, set_context
from .trainer import Trainer

__all__ = ["check_replicas", "place_batch", "Block", "export_safetensors", "latest_checkpoint", "load_checkpoint", "load_full", "save_checkpoint",
           "Config", "ConfigError", "load_config", "ShardedSampler", "TokenDataset", "get_dataloader", "Engine",
           "initialize", "model_plan", "parallelize_model", "CheckpointHook", "Hook", "LRSchedulerHook", "MetricLoggerHook",
           "ThroughputHook", "Context", "context_for", "current_context", "set_context", "launch", "launch_from_slurm", "launch_from_torch", "Trainer"]
