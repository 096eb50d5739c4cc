"""engine.replicate_degree: validated up front, and filled into DeepSpeed's ZeRO++ hpZ partition size."""
from __future__ import annotations

import pytest
import torch

from dist_tune.cluster import ClusterEnv
from dist_tune.config import ConfigError, load_config
from dist_tune.engines.registry import build_engine
from dist_tune.engines.deepspeed import ds_config
from dist_tune.errors import UserError


def test_replicate_degree_needs_a_sharding_engine():
    with pytest.raises(ConfigError) as err:
        load_config(None, {"engine.kind": "ddp", "engine.replicate_degree": 2})
    assert str(err.value) == ("engine.replicate_degree (hierarchical sharding) needs engine.kind=fsdp, or deepspeed "
                              "with engine.zero_stage=3; set engine.replicate_degree=1")
    with pytest.raises(ConfigError, match="^engine.replicate_degree must be >= 1$"):
        load_config(None, {"engine.kind": "fsdp", "engine.replicate_degree": 0})


def test_replicate_degree_must_divide_the_world_size():
    cfg = load_config(None, {"engine.kind": "deepspeed", "engine.zero_stage": 3, "engine.replicate_degree": 4})
    env = ClusterEnv(world_size=6, local_world_size=6, launcher="torchrun")
    with pytest.raises(UserError, match="^engine.replicate_degree=4 does not divide the world size 6; set it to a "
                                        "divisor, usually the number of nodes$"):
        build_engine(cfg, env, torch.device("cpu"))


def test_deepspeed_hpz_partition_is_the_shard_group_size():
    cfg = load_config(None, {"engine.kind": "deepspeed", "engine.zero_stage": 3, "engine.replicate_degree": 2})
    assert ds_config(cfg, world_size=8, hidden_size=64)["zero_optimization"]["zero_hpz_partition_size"] == 4
    plain = load_config(None, {"engine.kind": "deepspeed", "engine.zero_stage": 3})
    assert "zero_hpz_partition_size" not in ds_config(plain, world_size=8, hidden_size=64)["zero_optimization"]
