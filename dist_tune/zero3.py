"""ZeRO-3 partitioned construction: the model is built under `deepspeed.zero.Init` (through transformers'
HfDeepSpeedConfig), so each parameter is partitioned as its module is created; weights then arrive one parameter at
a time, read by rank 0 and scattered to the partitions. No rank ever holds the whole model."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from dist_tune import safetensors_read


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


@contextlib.contextmanager
def partitioned_construction(conf: dict[str, Any]) -> Iterator[None]:
    """While active, transformers builds models under zero.Init with this DeepSpeed config."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig, unset_hf_deepspeed_config

    deepspeed.init_distributed(auto_mpi_discovery=False, dist_init_required=False)  # wraps the existing group
    active = HfDeepSpeedConfig(conf)  # noqa: F841  transformers holds only a weak reference
    try:
        yield
    finally:
        unset_hf_deepspeed_config()


def assign_partitioned(param: torch.Tensor, full: torch.Tensor | None) -> None:
    """Give a partitioned parameter the full value rank 0 holds (None on the other ranks). Collective."""
    import deepspeed

    with deepspeed.zero.GatheredParameters([param], modifier_rank=0), torch.no_grad():
        if dist.get_rank() == 0:
            param.copy_(full)


def gathered(param: torch.Tensor) -> torch.Tensor:
    """A partitioned parameter's full value on every rank (a copy). Collective."""
    import deepspeed

    with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
        return param.detach().clone()


def read_checkpoint(model: torch.nn.Module, source: Path, groups: dict[str, list[str]]) -> None:
    """Rank 0 reads each checkpoint tensor and scatters it to the partitions of the parameters that take it
    (models.checkpoint_plan says which); a parameter not partitioned (a peft copy) is read on every rank."""
    files = safetensors_read.entries(source)
    params = dict(model.named_parameters())
    for key, names in groups.items():
        everywhere = not all(is_partitioned(params[name]) for name in names)
        value = safetensors_read.read_rows(files[key]) if everywhere or dist.get_rank() == 0 else None
        for name in names:
            if is_partitioned(params[name]):
                assign_partitioned(params[name], value)
            else:
                with torch.no_grad():
                    params[name].copy_(value)
