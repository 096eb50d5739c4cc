"""Model and tokenizer loading: a local HF directory, a Hugging Face Hub id (via the hub cache), or a named
random-init preset with the shipped tokenizer."""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedTokenizerBase,
)

from dist_tune import attention, hub, init_weights, safetensors_read
from dist_tune.config import (Config, ModelConfig, bf16_device, data_formats, flattened, qlora_compute_dtype,
                              resolve_padding_free, resolve_precision, uses_target_logits)
from dist_tune.errors import UserError
from transformers.integrations import is_deepspeed_zero3_enabled

TOKENIZER_DIR = Path(__file__).parent / "assets" / "tokenizer"

PRESETS: dict[str, dict] = {
    "tiny-llama": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
    "small-llama": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                         tie_word_embeddings=True, rope_theta=500000.0),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                       rope_theta=500000.0),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
log = logging.getLogger(__name__)


@functools.cache
def _warn_remote_code(name: str) -> None:
    log.warning("model.trust_remote_code=true: the Python files that come with '%s' run in this process", name)


def remote_code(cfg: Config) -> dict:
    """from_pretrained's trust_remote_code: a model's own Python code runs only when the user turned it on."""
    if cfg.model.trust_remote_code:
        _warn_remote_code(cfg.model.name_or_path)
    return {"trust_remote_code": cfg.model.trust_remote_code}


@contextlib.contextmanager
def refusing_remote_code(cfg: Config) -> Iterator[None]:
    """transformers' refusal of a model that needs its own code, as one line naming the switch."""
    try:
        yield
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise UserError(f"model '{cfg.model.name_or_path}' needs its own Python code to load (a custom architecture "
                        "shipped with it); read that code, then set model.trust_remote_code=true to run it") from None


def load_tokenizer(cfg: Config) -> PreTrainedTokenizerBase:
    """The model directory's tokenizer, or the shipped one for presets; a pad token is always set, and a chat
    template for chat data (so every directory saved with it renders conversations as training did)."""
    source = TOKENIZER_DIR if cfg.model.name_or_path in PRESETS else _model_dir(cfg.model)
    with refusing_remote_code(cfg):
        tokenizer = AutoTokenizer.from_pretrained(str(source), **remote_code(cfg))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise UserError(f"tokenizer at '{source}' has no pad, eos or unk token; add a pad token to its tokenizer_config.json")
    if "chat" in data_formats(cfg):  # the run's own format or a chat source of a mixture
        from dist_tune.data.chat import ensure_chat_template

        ensure_chat_template(tokenizer)
    return tokenizer


def fetch_model(cfg: Config) -> None:
    """Put a hub model's config, tokenizer and weights in the local hub cache (presets and directories: checked)."""
    if cfg.model.name_or_path not in PRESETS:
        _model_dir(cfg.model, weights=True)


def _model_dir(model: ModelConfig, weights: bool = False) -> Path:
    """model.name_or_path as a local directory: itself, or a hub id's snapshot in the hub cache (weights: with
    its safetensors, else only config and tokenizer files)."""
    path = Path(model.name_or_path).expanduser()
    if not path.is_dir() and hub.is_hub_id(model.name_or_path):
        path = hub.snapshot(model.name_or_path, model.revision, weights=weights)
    if not path.is_dir():
        raise UserError(f"model path '{model.name_or_path}' not found; set model.name_or_path to a local HF model "
                        f"directory, a Hugging Face Hub id or a preset ({', '.join(PRESETS)})")
    if not (path / "config.json").is_file():
        raise UserError(f"model path '{model.name_or_path}' has no config.json, so it is not a HF model directory; "
                        "point model.name_or_path at the folder written by save_pretrained")
    return path


def model_directory(model: ModelConfig) -> Path:
    """The local directory holding model.name_or_path's weights (a hub id: its snapshot in the hub cache)."""
    return _model_dir(model, weights=True)


def model_config(cfg: Config, tokenizer: PreTrainedTokenizerBase):
    """The transformers config the model will be built or loaded with."""
    if cfg.model.name_or_path in PRESETS:
        shape = {"vocab_size": len(tokenizer), **PRESETS[cfg.model.name_or_path]}
        hf_cfg = LlamaConfig(**shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    else:
        with refusing_remote_code(cfg):
            hf_cfg = AutoConfig.from_pretrained(str(_model_dir(cfg.model)), **remote_code(cfg))
    if cfg.model.max_position_embeddings:
        hf_cfg.max_position_embeddings = cfg.model.max_position_embeddings
    if cfg.model.task != "causal_lm":
        hf_cfg.num_labels = 1 if cfg.model.task == "regression" else cfg.model.num_labels
        hf_cfg.problem_type = "regression" if cfg.model.task == "regression" else "single_label_classification"
    if getattr(hf_cfg, "pad_token_id", None) is None:
        hf_cfg.pad_token_id = tokenizer.pad_token_id
    return hf_cfg


def check_sequence_length(cfg: Config, tokenizer: PreTrainedTokenizerBase) -> None:
    """data.max_length (the longest row, or the packed block) must fit the model's position embeddings."""
    hf_cfg = model_config(cfg, tokenizer)
    limit = getattr(hf_cfg, "max_position_embeddings", None) or getattr(hf_cfg, "n_positions", None)
    if limit and cfg.data.max_length > limit:
        raise UserError(f"data.max_length={cfg.data.max_length} is longer than model '{cfg.model.name_or_path}' "
                        f"supports (max_position_embeddings={limit}); set data.max_length to at most {limit}")


def auto_class(task: str):
    return AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification


def attention_implementation(cfg: Config) -> str:
    """model.attn_implementation, with sdpa swapped for its varlen form when micro-batches are padding-free rows."""
    if cfg.model.attn_implementation == "sdpa" and flattened(cfg):
        return attention.register()
    return cfg.model.attn_implementation


def attention_window(hf_cfg) -> int | None:
    """The model's sliding attention window in tokens (None: full attention)."""
    return getattr(hf_cfg, "sliding_window", None) if getattr(hf_cfg, "use_sliding_window", True) else None


def settle_padding_free(cfg: Config, tokenizer: PreTrainedTokenizerBase) -> None:
    """data.padding_free=auto → true or false for this model (its attention window is in its config); run it
    before any collator is built. load_model settles it too, for callers that load a model first."""
    resolve_padding_free(cfg, attention_window(model_config(cfg, tokenizer)))


def check_sliding_window(cfg: Config, hf_cfg) -> None:
    """Padding-free rows attend causally within each example; a window shorter than an example would be ignored."""
    window = attention_window(hf_cfg)
    if flattened(cfg) and window and window < cfg.data.max_length:
        raise UserError(f"model '{cfg.model.name_or_path}' uses sliding-window attention ({window} tokens), which "
                        f"padding-free rows do not apply; set data.max_length<={window} or data.padding_free=false "
                        "and data.pack=false")


def check_logits_to_keep(cfg: Config, model: torch.nn.Module) -> None:
    """train.target_logits_only passes `logits_to_keep` positions, which the model's forward must accept."""
    if uses_target_logits(cfg) and "logits_to_keep" not in inspect.signature(model.forward).parameters:
        raise UserError(f"model '{cfg.model.name_or_path}' ({type(model).__name__}) has no logits_to_keep argument; "
                        "set train.target_logits_only=false")


def model_dtype(cfg: Config, device: torch.device | str) -> torch.dtype:
    """model.dtype; `auto` (only left in configs that no run resolved) as it resolves on `device`."""
    if cfg.model.dtype == "auto":
        return DTYPES[resolve_precision(copy.deepcopy(cfg), bf16_device(device)).model.dtype]
    return DTYPES[cfg.model.dtype]


def load_model(cfg: Config, tokenizer: PreTrainedTokenizerBase, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Build the preset (seeded random init) or load local weights, in model.dtype, on `device`."""
    hf_cfg = model_config(cfg, tokenizer)
    resolve_padding_free(cfg, attention_window(hf_cfg))
    check_sliding_window(cfg, hf_cfg)
    dtype = model_dtype(cfg, device)
    auto = auto_class(cfg.model.task)
    torch.manual_seed(cfg.train.seed)
    if cfg.peft.load_in_4bit:
        return load_4bit(cfg, hf_cfg, auto)
    device = torch.device(device)
    if is_deepspeed_zero3_enabled():  # under the engine's partitioned construction: weights come later
        model = auto.from_config(hf_cfg, dtype=dtype, attn_implementation=attention_implementation(cfg),
                                 **remote_code(cfg))
    elif cfg.model.name_or_path in PRESETS or device.type == "meta":  # meta: the engine loads or initialises later
        with torch.device("meta"):
            model = auto.from_config(hf_cfg, dtype=dtype, attn_implementation=attention_implementation(cfg),
                                     **remote_code(cfg))
        if device.type != "meta":
            init_weights.materialise(model, device)
            init_weights.initialise(model, [name for name, _ in model.named_parameters()], cfg.train.seed)
    else:
        model = load_pretrained(cfg, hf_cfg, auto, dtype, device)
    check_logits_to_keep(cfg, model)
    return model


def load_pretrained(cfg: Config, hf_cfg, auto, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """The whole checkpoint through from_pretrained; weights it lacks (a new classification head) are initialised
    by name, as sharded loading does."""
    source = model_directory(cfg.model)
    with torch.device(device):
        model, info = auto.from_pretrained(str(source), config=hf_cfg, dtype=dtype, output_loading_info=True,
                                           **remote_code(cfg),
                                           attn_implementation=attention_implementation(cfg))
    missing = sorted(set(info["missing_keys"]) & {name for name, _ in model.named_parameters()})
    check_complete(cfg, model, missing, source)
    init_weights.initialise(model, missing, cfg.train.seed)
    return model


def check_complete(cfg: Config, model: torch.nn.Module, missing: list[str], source: Path) -> None:
    """Only a classifier's new head may be absent from a pretrained checkpoint."""
    needed = [name for name in missing if init_weights.required(name, model, cfg.model.task)]
    if needed:
        raise UserError(f"checkpoint '{source}' has no tensor '{needed[0]}' ({len(needed)} weights missing); point "
                        "model.name_or_path at a complete save_pretrained directory")


def checkpoint_plan(model: torch.nn.Module, cfg: Config) -> tuple[Path, dict[str, list[str]]]:
    """(model directory, each checkpoint tensor it must read → the parameters that take it: several for peft's
    modules_to_save copies) for a model built empty; missing or misshapen weights are one-line errors."""
    source = model_directory(cfg.model)
    keys = safetensors_read.entries(source)
    if not keys:
        raise UserError(f"model directory '{source}' has no .safetensors weights, which sharded engines read tensor "
                        "by tensor; re-save it with save_pretrained(safe_serialization=True)")
    params, prefix = dict(model.named_parameters()), init_weights.base_model(model).base_model_prefix
    groups: dict[str, list[str]] = {}
    missing = []
    for name, (hf_name, added) in init_weights.hf_names(model).items():
        key = None if added else init_weights.checkpoint_key(hf_name, keys, prefix)
        if key is not None:
            groups.setdefault(key, []).append(name)
        elif not added and init_weights.required(hf_name, model, cfg.model.task):
            missing.append(hf_name)
    check_complete(cfg, model, missing, source)
    for key, names in groups.items():
        shape = tuple(init_weights.full_shape(params[names[0]]))
        if keys[key].shape != shape:
            raise UserError(f"checkpoint tensor '{key}' in '{source}' has shape {keys[key].shape} but the model "
                            f"needs {shape}; check the model directory's config.json")
    return source, groups


def load_weights(model: torch.nn.Module, cfg: Config, read_checkpoint) -> None:
    """Every parameter's first value in a model built empty (meta, or ZeRO-3 partitions): `read_checkpoint(model,
    source, groups)` reads the checkpoint's tensors into their parameters; the rest (presets, adapters, a new head)
    are initialised by name exactly as the unsharded engines initialise them."""
    loaded: set[str] = set()
    if cfg.model.name_or_path not in PRESETS:
        source, groups = checkpoint_plan(model, cfg)
        read_checkpoint(model, source, groups)
        loaded = {name for names in groups.values() for name in names}
    init_weights.initialise(model, [name for name, _ in model.named_parameters() if name not in loaded],
                            cfg.train.seed)


def load_4bit(cfg: Config, hf_cfg, auto) -> torch.nn.Module:
    """QLoRA base: NF4 weights with double quantisation via bitsandbytes, on this process's GPU."""
    if not torch.cuda.is_available():
        raise UserError("peft.load_in_4bit (QLoRA) needs a CUDA GPU; set peft.load_in_4bit=false on this machine")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("peft.load_in_4bit needs bitsandbytes; pip install 'dist_tune[qlora]'") from None
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    compute = DTYPES[qlora_compute_dtype(cfg)]
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute)
    if cfg.model.name_or_path in PRESETS:
        raise UserError("peft.load_in_4bit quantises pretrained weights; point model.name_or_path at a local model")
    model = auto.from_pretrained(str(_model_dir(cfg.model, weights=True)), config=hf_cfg, dtype=compute,
                                 quantization_config=quant, device_map={"": torch.cuda.current_device()},
                                 **remote_code(cfg),
                                 attn_implementation=attention_implementation(cfg))
    check_logits_to_keep(cfg, model)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.engine.activation_checkpointing)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts, counting sharded parameters at full size."""
    total = trainable = 0
    for p in model.parameters():
        n = p.numel() if not hasattr(p, "ds_numel") else p.ds_numel
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable


BLOCK_LISTS = ("layers", "layer", "h", "blocks")


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks of a HF model (peft-wrapped or not): Llama's `model.layers`, GPT-2's
    `transformer.h`, BERT's `bert.encoder.layer`."""
    base = init_weights.base_model(model)
    backbone = getattr(base, base.base_model_prefix, base)
    for holder in (backbone, getattr(backbone, "encoder", None), getattr(backbone, "decoder", None)):
        for attr in BLOCK_LISTS:
            container = getattr(holder, attr, None)
            if isinstance(container, torch.nn.ModuleList):
                return list(container)
    return []
