"""Pipeline parallelism over a ``pipe`` mesh axis.

* :mod:`.partition`: split a list of blocks into stages (uniform, by parameter count, explicit).
* :mod:`.schedules`: GPipe, 1F1B and interleaved 1F1B as explicit per-rank action tables.
* :mod:`.simulate`: run a table without a model (message matching, deadlock check, timeline).
* :mod:`.executor`: :class:`Pipeline`, which runs a training step with a schedule.
* :mod:`.stage`: build only this rank's blocks (meta device, then materialize/load).
* :mod:`.timeline`: draw a schedule as ASCII or as a matplotlib picture.
"""
from .blocks import FunctionalBlock
from .executor import Pipeline
from .partition import balanced, from_boundaries, partition, uniform
from .schedules import Action, Schedule, make_schedule
from .simulate import ScheduleError, Timeline, simulate
from .stage import build_stage, materialize, materialized_bytes, stage_block_indices

__all__ = ["Pipeline", "FunctionalBlock", "partition", "uniform", "balanced", "from_boundaries",
           "Action", "Schedule", "make_schedule", "simulate", "ScheduleError", "Timeline",
           "build_stage", "materialize", "materialized_bytes", "stage_block_indices"]
