"""Where each parameter's first value comes from: its HF checkpoint name, and a deterministic initialisation by that
name (seeded from train.seed and the name), identical for plain tensors and for DTensor shards, so every engine
starts from the same weights."""
from __future__ import annotations

import hashlib
import math
from typing import Iterable

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from dist_tune import zero3

# Children through which peft wraps a HF module without changing its weights (LoRA/IA3 `base_layer`,
# modules_to_save's `original_module` and `modules_to_save.<adapter>` copy, LLaMA-Adapter's wrapped `model`).
PASSTHROUGH = {"base_layer": 1, "original_module": 1, "model": 1, "modules_to_save": 2}
NORMAL = ("prompt_encoder", "adaption_prompt", "lora_embedding_B")
ZEROS = ("lora_B", "lora_embedding_A", "adaption_gate")
ONES = ("ia3_",)
DORA_MAGNITUDE = "lora_magnitude_vector"


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model (inside a peft wrapper, if any)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _is_peft_module(module: torch.nn.Module) -> bool:
    return any(cls.__module__.startswith("peft.") for cls in type(module).__mro__)


def _hf_name(base: torch.nn.Module, relative: str) -> tuple[str, bool]:
    """(name without peft's wrapper segments, whether peft added the parameter) for a name relative to `base`."""
    parts, kept, module, added = relative.split("."), [], base, False
    i = 0
    while i < len(parts) - 1:
        in_peft = _is_peft_module(module)
        skip = PASSTHROUGH.get(parts[i], 0) if in_peft else 0
        added = added or (in_peft and not skip)
        step = skip or 1
        module = module.get_submodule(".".join(parts[i:i + step]))
        kept += [] if skip else [parts[i]]
        i += step
    return ".".join([*kept, parts[-1]]), added or _is_peft_module(module)


def hf_names(model: torch.nn.Module) -> dict[str, tuple[str, bool]]:
    """Each parameter's name → (its HF checkpoint name, whether peft added it). Adapter parameters keep their peft
    segments (`...q_proj.lora_A.default.weight`); prompt encoders, outside the base model, keep their full name."""
    base = base_model(model)
    prefix = next(name for name, module in model.named_modules() if module is base)
    prefix = f"{prefix}." if prefix else ""
    names = {}
    for name, _ in model.named_parameters():
        names[name] = _hf_name(base, name[len(prefix):]) if name.startswith(prefix) else (name, True)
    return names


def parameter_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def initial_value(name: str, shape: torch.Size, seed: int, std: float,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The full starting value of the parameter with HF name `name`: peft's initialisation for adapters
    (LoRA A kaiming-uniform(a=√5), B zeros; IA3 ones; prompts and adaption prompts N(0, 1); gates zeros), and for
    base weights HF's (matrices N(0, std), biases zeros, other vectors (norms) ones)."""
    generator = torch.Generator().manual_seed(parameter_seed(seed, name))
    leaf = name.split(".")
    if any(part.startswith(ONES) for part in leaf):
        return torch.ones(shape, dtype=dtype)
    if any(part in ZEROS for part in leaf):
        return torch.zeros(shape, dtype=dtype)
    if "lora_A" in leaf:
        bound = 1.0 / math.sqrt(shape[1])  # kaiming_uniform_(a=sqrt(5)) on an (r, fan_in) weight
        return torch.empty(shape, dtype=dtype).uniform_(-bound, bound, generator=generator)
    if any(part in NORMAL for part in leaf):
        return torch.empty(shape, dtype=dtype).normal_(0.0, 1.0, generator=generator)
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    if len(shape) < 2:
        return torch.ones(shape, dtype=dtype)
    return torch.empty(shape, dtype=dtype).normal_(0.0, std, generator=generator)


def dora_magnitude(layer: torch.nn.Module) -> torch.Tensor:
    """DoRA's starting magnitude: the norm of each output row of the base weight (LoRA B is zero), as peft has it."""
    weight = layer.base_layer.weight
    if isinstance(weight, DTensor):
        weight = weight.full_tensor()
    elif zero3.is_partitioned(weight):
        weight = zero3.gathered(weight)
    weight = weight.detach().float().cpu()
    return torch.linalg.norm(weight.T if getattr(layer, "fan_in_fan_out", False) else weight, dim=1)


def full_shape(param: torch.Tensor) -> torch.Size:
    """A parameter's whole shape, also for a DTensor shard or a ZeRO-3 partition."""
    return getattr(param, "ds_shape", param.shape)


def assign(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full value into a parameter; a DTensor keeps only its own shard (sliced locally, no communication), a
    ZeRO-3 partition takes rank 0's value (collective)."""
    if zero3.is_partitioned(param):
        zero3.assign_partitioned(param, full)
        return
    with torch.no_grad():
        if isinstance(param, DTensor):
            local = distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(local.to_local())
        else:
            param.copy_(full)


def initialise(model: torch.nn.Module, names: Iterable[str], seed: int) -> None:
    """Give the named parameters their value by name, one full parameter at a time (DoRA magnitudes last: they
    derive from base weights)."""
    params, hf = dict(model.named_parameters()), hf_names(model)
    std = getattr(base_model(model).config, "initializer_range", 0.02)
    names = sorted(names, key=lambda n: DORA_MAGNITUDE in n)
    for name in names:
        param = params[name]
        if DORA_MAGNITUDE in name:
            layer = model.get_submodule(name.split(f".{DORA_MAGNITUDE}.")[0])
            if layer.base_layer.weight.is_floating_point():  # a 4-bit base keeps peft's dequantised norm
                assign(param, dora_magnitude(layer))
        else:
            assign(param, initial_value(hf[name][0], full_shape(param), seed, std, param.dtype))


def shared_parameters(model: torch.nn.Module) -> list[tuple[str, str]]:
    """(second name, first name) of each parameter registered under several names (tied embeddings: GPT-2's
    `lm_head.weight` is `transformer.wte.weight`)."""
    first: dict[int, str] = {}
    pairs = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(param), name) != name:
            pairs.append((name, first[id(param)]))
    return pairs


def tied_embeddings(model: torch.nn.Module) -> bool:
    """Whether the input embedding and the output head share their weight (GPT-2, Llama-3.2); False for a model
    without an output head (a classifier)."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embedding is None:
        return False
    return not {id(p) for p in head.parameters()}.isdisjoint(map(id, embedding.parameters()))


def materialise(model: torch.nn.Module, device: torch.device) -> None:
    """Allocate a meta-built model's parameters and buffers on `device` (values undefined), keeping tied
    parameters tied, and recompute its buffers (rotary inv_freq, position ids) the way transformers does after
    loading."""
    shared = shared_parameters(model)
    model.to_empty(device=device)
    for alias, owner in shared:
        module, _, attr = alias.rpartition(".")
        setattr(model.get_submodule(module), attr, model.get_parameter(owner))
    base = base_model(model)
    with torch.no_grad():
        for module in model.modules():
            if list(module.buffers(recurse=False)):
                base._init_weights(module)


def built_empty(model: torch.nn.Module) -> bool:
    """Built on meta or as ZeRO-3 partitions: the engine loads or initialises every parameter once it is sharded."""
    first = next(model.parameters())
    return first.is_meta or zero3.is_partitioned(first)


def added_by_peft(model: torch.nn.Module) -> list[str]:
    return [name for name, (_, added) in hf_names(model).items() if added]


def checkpoint_key(name: str, keys, prefix: str) -> str | None:
    """The checkpoint's key for HF name `name`, also when one of them lacks the backbone prefix (`model.`, `bert.`)
    that a task model adds to a base model's names."""
    for candidate in (name, name.removeprefix(f"{prefix}."), f"{prefix}.{name}"):
        if candidate in keys:
            return candidate
    return None


def required(name: str, model: torch.nn.Module, task: str) -> bool:
    """Whether a checkpoint must hold base weight `name`: all of a causal LM, a classifier's backbone (its new
    head is initialised by name)."""
    return task == "causal_lm" or name.startswith(f"{base_model(model).base_model_prefix}.")
