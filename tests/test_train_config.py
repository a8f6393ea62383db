"""Config validation: every documented mistake gives a ConfigError that names the key and the fix."""
from __future__ import annotations

import logging

import pytest

from meshpar.train.config import ConfigError, load_config


def test_full_example_config():
    cfg = load_config(dict(parallel=dict(data=2, pipeline=1, tensor=dict(size=4, mode="2d"),
                                         sequence=dict(size=1, mode="ring")),
                           zero=dict(stage=1), precision="bf16", gradient_accumulation=2, clip_grad_norm=1.0),
                      world_size=8)
    assert cfg.parallel.mesh_names == ("data", "x", "y")
    assert cfg.parallel.mesh_shape == (2, 2, 2)
    full = load_config(dict(parallel=dict(data=1, pipeline=2, tensor=dict(size=2, mode="1d"), sequence=2)),
                       world_size=8)
    assert full.parallel.mesh_names == ("pipe", "data", "tp", "sp") and full.parallel.mesh_shape == (2, 1, 2, 2)
    assert cfg.zero_stage == 1 and cfg.precision == "bf16" and cfg.gradient_accumulation == 2
    assert cfg.clip_grad_norm == 1.0


@pytest.mark.parametrize("mode,size,depth,names,shape", [
    ("1d", 4, 1, ("tp",), (4,)), ("2d", 9, 1, ("x", "y"), (3, 3)),
    ("2.5d", 8, 2, ("d", "x", "y"), (2, 2, 2)), ("3d", 8, 1, ("i", "j", "k"), (2, 2, 2))])
def test_mesh_axes_per_mode(mode, size, depth, names, shape):
    cfg = load_config(dict(parallel=dict(tensor=dict(size=size, mode=mode, depth=depth))), world_size=size)
    assert cfg.parallel.mesh_names == ("data",) + names
    assert cfg.parallel.mesh_shape == (1,) + shape


def test_2d_not_square():
    with pytest.raises(ConfigError, match="2D mode needs a perfect-square size.*size=6"):
        load_config(dict(parallel=dict(tensor=dict(size=6, mode="2d"))))


def test_25d_not_depth_q2():
    with pytest.raises(ConfigError, match=r"2.5D size must be depth x q\^2"):
        load_config(dict(parallel=dict(tensor=dict(size=12, mode="2.5d", depth=2))))
    with pytest.raises(ConfigError, match="not divisible by depth"):
        load_config(dict(parallel=dict(tensor=dict(size=9, mode="2.5d", depth=2))))
    with pytest.raises(ConfigError, match="needs a depth"):
        load_config(dict(parallel=dict(tensor=dict(size=8, mode="2.5d"))))


def test_3d_not_cube():
    with pytest.raises(ConfigError, match="3D mode needs a cube size.*size=9"):
        load_config(dict(parallel=dict(tensor=dict(size=9, mode="3d"))))


def test_axis_product_not_world():
    with pytest.raises(ConfigError, match=r"multiply to .* = 8, but the world has 4 processes"):
        load_config(dict(parallel=dict(data=2, tensor=dict(size=4, mode="2d"))), world_size=4)


def test_data_inferred_with_log(caplog):
    with caplog.at_level(logging.INFO, logger="meshpar.train.config"):
        cfg = load_config(dict(parallel=dict(tensor=dict(size=4, mode="1d"))), world_size=8)
    assert cfg.parallel.data == 2
    assert any("inferred data=2" in r.getMessage() for r in caplog.records)
    assert any("inferred data=2" in n for n in cfg.notes)
    with pytest.raises(ConfigError, match="cannot infer parallel.data"):
        load_config(dict(parallel=dict(tensor=dict(size=4, mode="1d"))), world_size=6)


def test_batch_smaller_than_sharded_dim():
    with pytest.raises(ConfigError, match=r"batch_size=2 is smaller than the 4 ranks .*data=2 x x=2"):
        load_config(dict(parallel=dict(data=2, tensor=dict(size=4, mode="2d")), train=dict(batch_size=2)),
                    world_size=8)
    with pytest.raises(ConfigError, match="not divisible by the 4 ranks"):
        load_config(dict(parallel=dict(data=2, tensor=dict(size=4, mode="2d")), train=dict(batch_size=6)))
    load_config(dict(parallel=dict(data=2, tensor=dict(size=4, mode="2d")), train=dict(batch_size=8)))


def test_other_errors():
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(dict(paralel=dict(data=2)))
    with pytest.raises(ConfigError, match="zero.stage"):
        load_config(dict(zero=dict(stage=4)))
    with pytest.raises(ConfigError, match="precision"):
        load_config(dict(precision="fp8"))
    with pytest.raises(ConfigError, match="gradient_accumulation"):
        load_config(dict(gradient_accumulation=0))
    with pytest.raises(ConfigError, match="mode must be one of"):
        load_config(dict(parallel=dict(tensor=dict(size=4, mode="4d"))))
    with pytest.raises(ConfigError, match="sequence length 30 is not divisible"):
        load_config(dict(parallel=dict(sequence=dict(size=4)), model=dict(block_size=30)))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/cfg.py")


def test_python_and_toml_files(tmp_path):
    py = tmp_path / "cfg.py"
    py.write_text("import math\nparallel = dict(data=2, tensor=dict(size=4, mode='2d'))\nprecision='bf16'\n"
                  "_private = 3\n")
    cfg = load_config(py, world_size=8)
    assert cfg.parallel.tensor_mode == "2d" and cfg.precision == "bf16"
    toml = tmp_path / "cfg.toml"
    toml.write_text('precision = "bf16"\n[parallel]\ndata = 2\n[parallel.tensor]\nsize = 4\nmode = "2d"\n'
                    '[train]\nbatch_size = 8\n')
    cfg2 = load_config(toml, world_size=8, overrides={"train.steps": 5})
    assert cfg2.parallel == cfg.parallel and cfg2.section("train") == {"batch_size": 8, "steps": 5}


@pytest.mark.parametrize("tensor,names", [(dict(size=1, mode="1d"), ("data", "tp")),
                                          (dict(size=1, mode="2d"), ("data", "x", "y")),
                                          (dict(size=1, mode="2.5d", depth=1), ("data", "d", "x", "y")),
                                          (dict(size=1, mode="3d"), ("data", "i", "j", "k"))])
def test_tensor_size_one_is_a_one_rank_layout(tensor, names, caplog):
    """A mode with size 1: the mode's axes, all of size 1 (a plan measured or developed on one GPU)."""
    with caplog.at_level(logging.INFO, logger="meshpar.train.config"):
        cfg = load_config(dict(parallel=dict(tensor=tensor)), world_size=1)
    assert cfg.parallel.mesh_names == names and set(cfg.parallel.mesh_shape) == {1}
    assert "one-rank layout" in caplog.text
