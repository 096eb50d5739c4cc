"""The HF directories a run writes: `final/` at the end of training (`export_final`, every rank of the job), and
offline (one process) the export of any engine's checkpoint; loading trained runs, adapter merging. Both writers
share the adapter and model writers (`write_adapter`, `write_model`)."""
from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch

from dist_tune import checkpoint as ckpt
from dist_tune import checkpoint_trust as trust
from dist_tune import hf_save
from dist_tune.config import Config, config_from_dict, qlora_compute_dtype, read_yaml
from dist_tune.engines.base import Engine
from dist_tune.errors import UserError
from dist_tune.models import count_parameters, load_model, load_tokenizer
from dist_tune.peft import build_model, is_peft_model

# what each peft method learns that is not a weight of the base model, so cannot be merged into it
UNMERGEABLE = {"prefix_tuning": "per-layer prefix key/values", "prompt_tuning": "virtual input tokens",
               "adapter": "adaption prompts"}


def run_config(run_dir: Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"'{run_dir}' is not a dist_tune run directory (no config.yaml); pass the folder "
                        "that `dist-tune train` printed as its run dir")
    return config_from_dict(read_yaml(path))


Reader = Callable[[Sequence[str]], dict[str, torch.Tensor]]


def _torch_weights(file: Path) -> tuple[dict[str, torch.Size], Reader]:
    """engine_state.pt, memory-mapped: its optimizer state is never read."""
    state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)["model"]
    return {n: t.shape for n, t in state.items()}, lambda names: {n: state[n] for n in names}


def _dcp_weights(path: Path) -> tuple[dict[str, torch.Size], Reader]:
    """A DCP checkpoint's tensors under 'model' (shapes from its metadata); a read loads only the asked-for ones."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    specs = {key.removeprefix("model."): m for key, m in metadata.items()
             if key.startswith("model.") and isinstance(m, TensorStorageMetadata)}

    def read(names: Sequence[str]) -> dict[str, torch.Tensor]:
        state = {"model": {n: torch.empty(specs[n].size, dtype=specs[n].properties.dtype) for n in names}}
        with warnings.catch_warnings():  # no_dist=True still warns that no process group exists
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=dcp.FileSystemReader(str(path)), no_dist=True)
        return state["model"]
    return {n: m.size for n, m in specs.items()}, read


def _deepspeed_weights(path: Path) -> tuple[dict[str, torch.Size], Reader]:
    """The fp32 master weights, which DeepSpeed keeps only in its optimizer partition files: zero_to_fp32 maps
    those files into memory and drops the Adam moments unread. Under ZeRO-3 (lazy mode) it assembles a tensor from
    its partitions only when it is read; under ZeRO-1/2 it concatenates the fp32 partitions up front, so the fp32
    trainable weights are in memory once."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag="state", exclude_frozen_parameters=True,
                                                     lazy_mode=True)
    return {n: torch.Size(t.shape) for n, t in state.items()}, lambda names: {n: state[n].contiguous() for n in names}


def checkpoint_weights(path: Path) -> tuple[dict[str, torch.Size], Reader]:
    """The model tensors a checkpoint of any engine holds (name → shape), and a reader of some of them (whole, on
    CPU); no engine's optimizer state is read."""
    if (path / "engine_state.pt").is_file():
        return _torch_weights(path / "engine_state.pt")
    if (path / "dcp").is_dir():
        return _dcp_weights(path / "dcp")
    if (path / "deepspeed").is_dir():
        return _deepspeed_weights(path / "deepspeed")
    raise UserError(f"checkpoint '{path}' holds no engine state; it is incomplete or not a dist_tune checkpoint")


def stored_names(model: torch.nn.Module, stored: dict[str, torch.Size]) -> dict[str, str]:
    """Each parameter and buffer name of `model` → the name its tensor has in a checkpoint holding `stored`
    (a tied weight may be stored under any of its names)."""
    names: dict[int, list[str]] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(t), []).append(name)
    return {name: next((n for n in group if n in stored), name) for group in names.values() for name in group}


def check_weights(path: Path, model: torch.nn.Module, stored: dict[str, torch.Size], key: dict[str, str]) -> None:
    """The checkpoint holds every trainable tensor of the run's model, in its shape."""
    trainable = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(n for n in trainable if key[n] not in stored)
    if missing:
        raise UserError(f"checkpoint '{path}' lacks {missing[:3]} ({len(missing)} tensors) of the run's model; "
                        "export it with the config.yaml it was trained with")
    for name, shape in trainable.items():
        if stored[key[name]] != shape:
            raise UserError(f"checkpoint '{path}' holds '{name}' in shape {tuple(stored[key[name]])} but the run's "
                            f"model has {tuple(shape)}; export it with the config.yaml it was trained with")


def export_checkpoint(run_dir: Path, out_dir: Path | None = None, checkpoint: Path | None = None,
                      verify: bool = True) -> Path:
    """Write an HF directory from the latest (or given) complete checkpoint, reading only its model tensors,
    never optimizer state: a peft run's adapter directory, or the model as HF sharded safetensors of at most
    checkpoint.max_shard_size, converted file by file (only one output file's tensors in memory). The run's
    model is built on the meta device (a QLoRA run's without quantisation: only the adapter is written); only
    `freeze` runs, whose checkpoints lack the frozen base, load it. The checkpoint's pickles are checked and,
    with `verify` and the run's checkpoint.verify, its files against the digests recorded at save."""
    cfg = run_config(run_dir)
    path = Path(checkpoint) if checkpoint else ckpt.latest_checkpoint(Path(run_dir))
    if path is None or not ckpt.is_complete(path):
        raise UserError(f"no complete checkpoint in '{run_dir}'; train with checkpoint.save_steps set, "
                        "or pass --checkpoint checkpoints/step_N")
    found = ckpt.checked_share(path, verify and cfg.checkpoint.verify)
    if found:
        raise trust.integrity_error(path, found)
    stored, read = checkpoint_weights(path)
    tokenizer = load_tokenizer(cfg)
    model = build_model(unquantised_base(cfg), tokenizer, torch.device("meta"))
    key = stored_names(model, stored)
    check_weights(path, model, stored, key)
    out = Path(out_dir) if out_dir else Path(run_dir) / f"export-{path.name}"
    out.mkdir(parents=True, exist_ok=True)
    hf_save.clear_weights(out)
    if is_peft_model(model):
        write_adapter(model, _trainable(model, read, key), out)
    elif all(key[name] in stored for name in hf_save.state_tensors(model)):
        tensors = [hf_save.FullTensor(n, tuple(t.shape), t.dtype, t.detach)
                   for n, t in hf_save.state_tensors(model).items()]
        write_model(model, tensors, out, cfg.checkpoint.max_shard_size,
                    fetch=lambda group: _read_group(read, group, key))
    else:
        _export_frozen_run(build_model(cfg, tokenizer, torch.device("cpu")), read, key, out,
                           cfg.checkpoint.max_shard_size)
    tokenizer.save_pretrained(str(out))
    return out


def export_final(engine: Engine, tokenizer, out_dir: Path) -> None:
    """final/ at the end of training: a peft run's adapter directory, or the whole model as HF sharded
    safetensors; no rank ever holds the whole model (see `_final_adapter`, `write_model`). Collective: every rank
    calls it."""
    if engine.env.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        hf_save.clear_weights(out_dir)
    engine.barrier()
    if is_peft_model(engine.unwrap()):
        _final_adapter(engine, tokenizer, out_dir)
    else:
        write_model(engine.unwrap(), engine.full_tensors(), out_dir, engine.cfg.checkpoint.max_shard_size,
                    rank=engine.env.rank, world_size=engine.env.world_size)
    if engine.env.rank == 0:
        tokenizer.save_pretrained(str(out_dir))
    engine.barrier()


def _final_adapter(engine: Engine, tokenizer, out_dir: Path) -> None:
    """peft's own adapter directory. Sharded engines gather only the trainable tensors (every rank takes part,
    rank 0 keeps them) into the peft model rebuilt on the meta device (write_adapter); the others hold the whole
    model on rank 0 already."""
    if not engine.shards_state:
        if engine.env.rank == 0:
            engine.unwrap().save_pretrained(str(out_dir))
        return
    trained = {}
    for tensor in engine.full_tensors(trainable_only=True):
        value = tensor.gather()
        if engine.env.rank == 0:
            trained[tensor.name] = value.detach().to("cpu", tensor.dtype)
    if engine.env.rank == 0:
        write_adapter(build_model(engine.cfg, tokenizer, torch.device("meta")), trained, out_dir)


def _read_group(read: Reader, group: Sequence[hf_save.FullTensor], key: dict[str, str]) -> list[torch.Tensor]:
    state = read([key[t.name] for t in group])
    return [state[key[t.name]] for t in group]


def _trainable(model: torch.nn.Module, read: Reader, key: dict[str, str]) -> dict[str, torch.Tensor]:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    state = read([key[n] for n in names])
    return {n: state[key[n]] for n in names}


def write_adapter(model: torch.nn.Module, trained: dict[str, torch.Tensor], out: Path) -> None:
    """peft's own adapter directory from the trained tensors put into the peft model built on the meta device,
    so the frozen base is never gathered or read."""
    unexpected = model.load_state_dict(trained, strict=False, assign=True).unexpected_keys
    if unexpected:
        raise RuntimeError(f"the rebuilt peft model has no parameters {unexpected[:3]}")
    model.save_pretrained(str(out), save_embedding_layers=False)  # the base embeddings were frozen


def write_model(model: torch.nn.Module, tensors: Sequence[hf_save.FullTensor], out: Path, max_shard_size: str, *,
                rank: int = 0, world_size: int = 1, fetch: hf_save.Fetch = hf_save.gather_each) -> None:
    """HF sharded safetensors of at most max_shard_size, one output file's tensors fetched at a time, file i written
    by rank i % world size (hf_save.write_sharded), plus config.json and generation_config.json from rank 0.
    Collective when the tensors are gathered from a sharded engine: every rank calls it."""
    hf_save.write_sharded(out, tensors, rank=rank, world_size=world_size, max_shard_size=max_shard_size,
                          total_parameters=count_parameters(model)[0], fetch=fetch)
    if rank == 0:
        hf_save.write_config(model, out, hf_save.saved_dtype(tensors))


def _export_frozen_run(model: torch.nn.Module, read: Reader, key: dict[str, str], out: Path,
                       max_shard_size: str) -> None:
    """A `freeze` run: its trained tensors copied into the base model, loaded whole."""
    with torch.no_grad():
        for name, value in _trainable(model, read, key).items():
            model.get_parameter(name).copy_(value)
    model.save_pretrained(str(out), max_shard_size=max_shard_size)


def unquantised_base(cfg: Config) -> Config:
    """The config of the base an adapter is merged into: a QLoRA run's base without 4-bit quantisation, in the
    16-bit dtype it computed in (merging into NF4 weights would round the merged weights back to 4 bits)."""
    if not cfg.peft.load_in_4bit:
        return cfg
    base = copy.deepcopy(cfg)
    base.peft.load_in_4bit = False
    base.model.dtype = qlora_compute_dtype(cfg)
    return base


def load_trained(run_dir: Path, *, unquantised: bool = False) -> tuple[Config, torch.nn.Module, object]:
    """The final model of a run (base + adapter for peft runs), in eval mode; unquantised: a QLoRA adapter goes
    on the unquantised base (see `unquantised_base`)."""
    cfg = run_config(run_dir)
    final = Path(run_dir) / "final"
    if not final.is_dir():
        raise UserError(f"run '{run_dir}' has no final/ model; it did not finish — use `dist-tune export` on its "
                        "latest checkpoint")
    tokenizer = load_tokenizer(cfg)
    if (final / "adapter_config.json").is_file():
        from peft import PeftModel

        base = load_model(unquantised_base(cfg) if unquantised else cfg, tokenizer)
        model = PeftModel.from_pretrained(base, str(final))
    else:
        cfg.model.name_or_path = str(final)
        model = load_model(cfg, tokenizer)
    return cfg, model.eval(), tokenizer


def merge_adapter(run_dir: Path, out_dir: Path | None = None) -> Path:
    """Fold a peft adapter into the base weights and save a plain transformers model."""
    method = run_config(run_dir).peft.method
    if method in UNMERGEABLE:
        raise UserError(f"peft.method={method} learns {UNMERGEABLE[method]}, not changes to base weights, so it "
                        f"cannot be merged; use the adapter as is: PeftModel.from_pretrained(base_model, "
                        f"'{Path(run_dir) / 'final'}') or `dist-tune generate {run_dir} PROMPT`")
    _, model, tokenizer = load_trained(run_dir, unquantised=True)
    if not is_peft_model(model):
        raise UserError(f"run '{run_dir}' has no adapter to merge (peft.method was full or freeze); "
                        "its final/ directory is already a plain model")
    merged = model.merge_and_unload()
    out = Path(out_dir) if out_dir else Path(run_dir) / "merged"
    merged.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out
