"""Configs are validated whole by ``load_config``, before any process group: each bad config below is a
ConfigError whose message names the offending key (and, for typos, the closest known key)."""
from __future__ import annotations

import pytest

from meshpar.train.config import ConfigError, load_config

T = dict  # shorthand

# (config, world size or None, substrings the message must contain)
BAD = [
    (T(paralel=T(data=2)), None, ["'paralel'", "did you mean 'parallel'"]),
    (T(precison="bf16"), None, ["'precison'", "did you mean 'precision'"]),
    (T(parallel=T(dta=2)), None, ["'parallel.dta'", "did you mean 'parallel.data'"]),
    (T(parallel=T(tensor=T(size=4, mdoe="2d"))), None, ["'parallel.tensor.mdoe'", "'parallel.tensor.mode'"]),
    (T(parallel=T(tensor=T(szie=4, mode="2d"))), None, ["'parallel.tensor.szie'", "'parallel.tensor.size'"]),
    (T(parallel=T(sequence=T(size=2, mdoe="ring"))), None, ["'parallel.sequence.mdoe'"]),
    (T(zero=T(stgae=2)), None, ["'zero.stgae'", "did you mean 'zero.stage'"]),
    (T(zero=T(stage=1, options=T(bucket_md=4))), None, ["'zero.options.bucket_md'", "'zero.options.bucket_mb'"]),
    (T(pipeline_schedule=T(scheduel="1f1b")), None, ["'pipeline_schedule.scheduel'", "'pipeline_schedule.schedule'"]),
    (T(checkpoint=T(evrey=10)), None, ["'checkpoint.evrey'", "'checkpoint.every'"]),
    (T(log=T(evry=10)), None, ["'log.evry'", "'log.every'"]),
    (T(train=T(batchsize=8)), None, ["'train.batchsize'", "'train.batch_size'"]),
    (T(parallel=T(tensor=T(mode="2d"))), None, ["parallel.tensor.size", "add size=N"]),
    (T(parallel=T(tensor=T(size=4, mode="4d"))), None, ["parallel.tensor.mode"]),
    (T(parallel=T(tensor=T(size=4, mode=None))), None, ["parallel.tensor.size=4 needs a mode"]),
    (T(parallel=T(tensor=T(size=6, mode="2d"))), None, ["parallel.tensor", "perfect-square", "size=6"]),
    (T(parallel=T(tensor=T(size=8, mode="2.5d"))), None, ["parallel.tensor", "needs a depth"]),
    (T(parallel=T(tensor=T(size=4, mode="2d", depth=2))), None, ["parallel.tensor.depth", "'2.5d'"]),
    (T(parallel=T(tensor=T(size=9, mode="3d"))), None, ["parallel.tensor", "cube"]),
    (T(parallel=T(tensor="2d")), None, ["'parallel.tensor' must be a dict"]),
    (T(parallel=T(sequence=T(mode="ring"))), None, ["parallel.sequence.size"]),
    (T(parallel=T(sequence=T(size=2, mode="ulysses"))), None, ["parallel.sequence.mode"]),
    (T(parallel=T(data=0)), None, ["'parallel.data'"]),
    (T(parallel=T(pipeline=1.5)), None, ["'parallel.pipeline'"]),
    (T(parallel=T(data=2, tensor=T(size=4, mode="2d"))), 4, ["multiply to", "world has 4"]),
    (T(parallel=T(tensor=T(size=4, mode="1d"))), 6, ["cannot infer parallel.data"]),
    (T(zero=T(stage=4)), None, ["zero.stage"]),
    (T(zero=T(stage=True)), None, ["zero.stage"]),
    (T(zero="3"), None, ["'zero' must be a dict"]),
    (T(zero=T(stage=1, options=3)), None, ["'zero.options' must be a dict"]),
    (T(precision="fp8"), None, ["precision"]),
    (T(precision=16), None, ["precision"]),
    (T(gradient_accumulation=0), None, ["'gradient_accumulation'"]),
    (T(clip_grad_norm=-1.0), None, ["clip_grad_norm"]),
    (T(clip_grad_norm=True), None, ["clip_grad_norm"]),
    (T(seed=-1), None, ["'seed'"]),
    (T(pipeline_schedule=T(schedule="pipedream")), None, ["pipeline_schedule.schedule", "pipedream"]),
    (T(parallel=T(pipeline=2), pipeline_schedule=T(schedule="1F1B-typo")), None, ["pipeline_schedule.schedule"]),
    (T(parallel=T(pipeline=2), pipeline_schedule=T(schedule="interleaved", chunks=1)), None,
     ["pipeline_schedule", "interleaved", "chunks >= 2"]),
    (T(parallel=T(pipeline=2), pipeline_schedule=T(schedule="1f1b", chunks=2)), None,
     ["pipeline_schedule.chunks=2", "interleaved"]),
    (T(parallel=T(pipeline=2), pipeline_schedule=T(schedule="interleaved", chunks=2, num_microbatches=3)), None,
     ["pipeline_schedule.num_microbatches=3", "multiple of parallel.pipeline"]),
    (T(parallel=T(pipeline=2), pipeline_schedule=T(num_microbatches=0)), None, ["pipeline_schedule.num_microbatches"]),
    (T(parallel=T(pipeline=2), pipeline_schedule=T(partition="random")), None, ["pipeline_schedule.partition"]),
    (T(parallel=T(pipeline=2), zero=T(stage=3)), None, ["zero.stage=3", "parallel.pipeline"]),
    (T(parallel=T(pipeline=2), gradient_accumulation=2), None,
     ["gradient_accumulation=2", "num_microbatches"]),
    (T(parallel=T(data=2, tensor=T(size=4, mode="2d")), train=T(batch_size=2)), None, ["train.batch_size=2"]),
    (T(parallel=T(data=2, tensor=T(size=4, mode="2d")), train=T(batch_size=6)), None, ["train.batch_size=6"]),
    (T(parallel=T(pipeline=2, data=2), pipeline_schedule=T(num_microbatches=4), train=T(batch_size=12)), None,
     ["train.batch_size=12", "pipeline_schedule.num_microbatches"]),
    (T(parallel=T(sequence=T(size=4)), model=T(block_size=30)), None, ["parallel.sequence.size=4"]),
    (T(parallel=T(tensor=T(size=4, mode="1d")), model=T(n_embd=30)), None, ["model.n_embd=30"]),
    (T(train=T(steps=0)), None, ["'train.steps'"]),
    (T(checkpoint=T(every=-1)), None, ["'checkpoint.every'"]),
    (T(checkpoint=T(resume="yes")), None, ["checkpoint.resume"]),
    (T(log=T(every=0)), None, ["'log.every'"]),
    (T(model=3), None, ["'model' must be a dict"]),
    (T(train=[8]), None, ["'train' must be a dict"]),
]


@pytest.mark.parametrize("cfg,world,needles", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_config_is_a_config_error_naming_the_key(cfg, world, needles):
    with pytest.raises(ConfigError) as e:
        load_config(cfg, world_size=world)
    msg = str(e.value)
    for n in needles:
        assert n in msg, (n, msg)


def test_at_least_thirty_bad_configs():
    assert len(BAD) >= 30


def test_unknown_key_lists_the_known_keys():
    with pytest.raises(ConfigError) as e:
        load_config(dict(zero=dict(stgae=2)))
    assert "known keys of zero: ['options', 'stage']" in str(e.value)


def test_good_configs_still_load():
    cfg = load_config(dict(parallel=dict(pipeline=2, data=2), pipeline_schedule=dict(
        schedule="interleaved", chunks=2, num_microbatches=4), train=dict(batch_size=8)), world_size=4)
    assert cfg.parallel.mesh_names == ("pipe", "data")
    assert load_config(dict(parallel=dict(tensor=4)), world_size=4).parallel.tensor_mode == "1d"
    assert load_config(dict(parallel=dict(tensor=dict(size=4))), world_size=4).parallel.tensor_mode == "1d"
    assert load_config(dict(parallel=dict(tensor=None, sequence=None), zero=None)).parallel.world_size == 1
    assert load_config(dict(zero=2, model=dict(anything="the script's own"))).zero_stage == 2


def test_launch_validates_before_any_process_group(monkeypatch):
    import torch.distributed as dist

    from meshpar.train import launch

    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("process group touched"))
    with pytest.raises(ConfigError, match="zero.stgae"):
        launch(dict(zero=dict(stgae=2)), rank=0, world_size=1, backend="gloo")
