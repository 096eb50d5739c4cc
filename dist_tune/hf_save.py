"""Streaming HF save: a model's tensors, gathered whole one at a time, written as transformers' sharded
safetensors layout (`model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`, or one
`model.safetensors`). Files hold at most checkpoint.max_shard_size bytes and file i is written by rank
i % world_size, so no rank ever holds more than one file's worth of the model."""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

INDEX = "model.safetensors.index.json"
PATTERN = "model{suffix}.safetensors"
WEIGHT_FILES = ("model*.safetensors", INDEX, "adapter_model.safetensors", "adapter_config.json")


@dataclass(frozen=True)
class FullTensor:
    """One tensor of a model's saved state: its name, full shape and saved dtype, and how to get it whole
    (`gather`: collective under sharded engines; every rank calls it for the same tensors in the same order)."""
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    gather: Callable[[], torch.Tensor] = field(compare=False, repr=False)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


Fetch = Callable[[Sequence[FullTensor]], Iterable[torch.Tensor]]


def gather_each(group: Sequence[FullTensor]) -> Iterable[torch.Tensor]:
    return (t.gather() for t in group)


def plan_shards(tensors: Sequence[FullTensor], max_shard_size: int | str):
    """transformers' split of a state dict into shard files, computed from sizes alone: names in the order
    save_pretrained writes a loaded model in, then huggingface_hub's greedy rule, file names and total_size."""
    from huggingface_hub.serialization import split_state_dict_into_shards_factory
    from transformers.core_model_loading import dot_natural_key

    ordered = sorted(tensors, key=lambda t: dot_natural_key(t.name))
    return split_state_dict_into_shards_factory({t.name: t for t in ordered}, get_storage_size=lambda t: t.nbytes,
                                                get_storage_id=lambda t: None, filename_pattern=PATTERN,
                                                max_shard_size=max_shard_size)


def shard_owner(index: int, world_size: int) -> int:
    return index % world_size


def clear_weights(out_dir: Path) -> None:
    """Remove a previous save's weight files, so a stale `model.safetensors` or index cannot shadow the new one."""
    for pattern in WEIGHT_FILES:
        for path in Path(out_dir).glob(pattern):
            path.unlink()


@torch.no_grad()
def write_sharded(out_dir: Path, tensors: Sequence[FullTensor], *, rank: int = 0, world_size: int = 1,
                  max_shard_size: int | str = "1GB", total_parameters: int | None = None,
                  fetch: Fetch = gather_each) -> None:
    """Write `tensors` as HF sharded safetensors; every rank calls it (fetch gathers each file's tensors on all
    ranks, the file's owner keeps them) and rank 0 writes the index."""
    from safetensors.torch import save_file

    split = plan_shards(tensors, max_shard_size)
    by_name = {t.name: t for t in tensors}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, (filename, names) in enumerate(split.filename_to_tensors.items()):
        group = [by_name[n] for n in names]
        keep = shard_owner(i, world_size) == rank
        shard = {}
        for spec, value in zip(group, fetch(group)):
            if keep:
                shard[spec.name] = value.detach().to("cpu", spec.dtype).contiguous()
        if keep:
            save_file(shard, str(out_dir / filename), metadata={"format": "pt"})
    if split.is_sharded and rank == 0:
        metadata = {"total_size": split.metadata["total_size"]}
        if total_parameters is not None:
            metadata["total_parameters"] = total_parameters
        index = {"metadata": metadata, "weight_map": split.tensor_to_filename}
        (out_dir / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_config(model: torch.nn.Module, out_dir: Path, dtype: torch.dtype) -> None:
    """config.json (with the saved dtype and architecture, as save_pretrained writes them) and, for generative
    models, generation_config.json."""
    config = copy.deepcopy(model.config)
    config.dtype = str(dtype).split(".")[1]
    config.architectures = [type(model).__name__.removeprefix("FSDP")]
    config.save_pretrained(str(out_dir))
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(out_dir))


def saved_dtype(tensors: Sequence[FullTensor]) -> torch.dtype:
    """The dtype save_pretrained records: that of the first floating-point tensor."""
    return next((t.dtype for t in tensors if t.dtype.is_floating_point), torch.float32)


def state_tensors(module: torch.nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The module's state-dict entries as its own parameter and buffer objects (sharded ones unmaterialised), in
    state-dict order, with each shared tensor under its first name only (transformers saves GPT-2's tied
    `lm_head.weight` as `transformer.wte.weight`); trainable_only: the trainable parameters."""
    if trainable_only:
        return {name: p for name, p in module.named_parameters() if p.requires_grad}
    seen: set[int] = set()
    state = {}
    for name, value in module.state_dict(keep_vars=True).items():
        if id(value) not in seen:
            seen.add(id(value))
            state[name] = value
    return state
