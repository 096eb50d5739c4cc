"""The data formats: field checks, label encoding, prompt templates and batched tokenization."""
from __future__ import annotations

import datasets
import pyarrow.compute as pc

from dist_tune.config import Config
from dist_tune.data.chat import chat_prompt, encode_chat
from dist_tune.errors import DataError

IGNORE_INDEX = -100
ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n",
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
)
TEMPLATES = {"alpaca": ALPACA, "plain": ("{instruction}\n", "{instruction}\n{input}\n")}
TEXT_TYPES = ("string", "large_string")


def prompt_templates(template: str) -> tuple[str, str]:
    """(without input, with input) templates for a template name or a custom '{instruction}...' string."""
    if template in TEMPLATES:
        return TEMPLATES[template]
    try:
        template.format(instruction="", input="")
    except (KeyError, IndexError, ValueError):
        template = ""
    if "{instruction}" not in template:
        raise DataError(f"data.prompt_template '{template}' is unusable; use alpaca, plain, or a format string "
                        "with {instruction} and optionally {input}")
    return template, template


def prompt_for(cfg: Config, instruction: str, input: str = "") -> str:
    """The prompt text training used for this instruction (the instruction itself unless format=instruction).
    Encode it like training does: bos (if the tokenizer has one) + tokenizer(prompt, add_special_tokens=False)."""
    if cfg.data.format != "instruction":
        return instruction
    without_input, with_input = prompt_templates(cfg.data.prompt_template)
    return (with_input if input else without_input).format(instruction=instruction, input=input)


def prompt_ids(cfg: Config, tokenizer, instruction: str, input: str = "") -> list[int]:
    """The token ids training put before a response to this instruction: the chat template's rendering of it as
    a user turn plus the generation prompt (format=chat), else bos (if any) + the encoded `prompt_for` text."""
    if cfg.data.format == "chat":
        return tokenizer(chat_prompt(tokenizer, instruction, input), add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer(prompt_for(cfg, instruction, input), add_special_tokens=False)["input_ids"]


def field_keys(cfg: Config) -> dict[str, str]:
    """Fields the format needs, each mapped to the config key that names it."""
    data = cfg.data
    if data.format == "chat":
        return {}  # chat.normalize finds and checks the conversation column
    if data.format == "text":
        return {data.text_field: "data.text_field"}
    if data.format == "instruction":
        return {data.instruction_field: "data.instruction_field", data.output_field: "data.output_field"}
    return {data.text_field: "data.text_field", data.label_field: "data.label_field"}


def check_fields(dataset: datasets.Dataset, cfg: Config, source: str) -> None:
    """Every required field exists; text fields hold strings with no missing values."""
    text_fields = {}
    for field, key in field_keys(cfg).items():
        if field not in dataset.column_names:
            raise DataError(f"data file '{source}' has no field '{field}' (columns: {', '.join(dataset.column_names)});"
                            f" set {key} to the column that holds it")
        if key != "data.label_field":
            text_fields[field] = key
    if cfg.data.format == "instruction" and cfg.data.input_field in dataset.column_names:
        text_fields[cfg.data.input_field] = "data.input_field"
    for field, key in text_fields.items():
        dtype = getattr(dataset.features[field], "dtype", type(dataset.features[field]).__name__)
        if dtype == "null" and key == "data.input_field":
            continue
        if dtype not in TEXT_TYPES:
            raise DataError(f"field '{field}' in '{source}' holds {dtype} values, not text; set {key} to a text "
                            "column or store the values as strings")
        column = dataset.data.column(field)
        if column.null_count and key != "data.input_field":
            row = pc.index(pc.is_null(column), True).as_py() + 1
            raise DataError(f"row {row} of '{source}' has no value for '{field}'; fill it in or remove the row")


def label_names(cfg: Config, train: datasets.Dataset) -> list[str] | None:
    """Class names in index order: data.label_names, else sorted string labels of the train data,
    else '0'..'num_labels-1' for integer labels; None for regression and causal formats."""
    if cfg.model.task != "classification":
        return None
    names = cfg.data.label_names
    if names is None:
        values = train.unique(cfg.data.label_field)
        strings = sorted(v for v in values if isinstance(v, str))
        names = strings or [str(i) for i in range(cfg.model.num_labels)]
    if len(names) > cfg.model.num_labels:
        raise DataError(f"the data has {len(names)} classes ({', '.join(map(str, names))}) but model.num_labels="
                        f"{cfg.model.num_labels}; set model.num_labels={len(names)}")
    return list(names)


def _class_index(value: object, names: list[str], row: int, source: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value in names:
        return names.index(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        raise DataError(f"row {row} of '{source}' has label {value}, outside 0..{len(names) - 1}; fix the row or "
                        "raise model.num_labels (and data.label_names if set)")
    raise DataError(f"row {row} of '{source}' has label {value!r}, not one of {', '.join(names)}; fix the row or "
                    "list it in data.label_names")


def _regression_value(value: object, row: int, source: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise DataError(f"row {row} of '{source}' has label {value!r}, not a number; model.task=regression needs "
                    "numeric labels (or set model.task=classification)")


def encode_labels(dataset: datasets.Dataset, cfg: Config, names: list[str] | None, source: str) -> datasets.Dataset:
    """Replace the label column with class indices (classification) or floats (regression)."""
    field = cfg.data.label_field
    values = dataset.data.column(field).to_pylist()
    if names is None:
        encoded = [_regression_value(v, i + 1, source) for i, v in enumerate(values)]
    else:
        encoded = [_class_index(v, names, i + 1, source) for i, v in enumerate(values)]
    return dataset.remove_columns(field).add_column(field, encoded)


def output_features(cfg: Config, names: list[str] | None) -> datasets.Features:
    ids = datasets.Sequence(datasets.Value("int32"))
    if cfg.data.format != "classification":
        return datasets.Features({"input_ids": ids, "labels": ids})
    label = datasets.ClassLabel(names=names) if names is not None else datasets.Value("float32")
    return datasets.Features({"input_ids": ids, "labels": label})


def _bos_eos(tokenizer) -> tuple[list[int], list[int]]:
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos token, which text and instruction formats append; "
                        "use a tokenizer that defines eos_token")
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []), [tokenizer.eos_token_id]


def encode_text(batch: dict, *, tokenizer, cfg: Config) -> dict:
    """bos + document + eos; truncated to max_length unless the rows are packed later."""
    bos, eos = _bos_eos(tokenizer)
    limit = None if cfg.data.pack else cfg.data.max_length
    ids = tokenizer(batch[cfg.data.text_field], add_special_tokens=False)["input_ids"]
    rows = [(bos + x + eos)[:limit] for x in ids]
    return {"input_ids": rows, "labels": rows}


def encode_instruction(batch: dict, *, tokenizer, cfg: Config) -> dict:
    """bos + prompt + response + eos with the bos and prompt labels masked; rows whose response would be
    truncated away entirely are dropped."""
    bos, eos = _bos_eos(tokenizer)
    data = cfg.data
    inputs = batch.get(data.input_field) or [""] * len(batch[data.instruction_field])
    prompts = [prompt_for(cfg, ins, inp or "") for ins, inp in zip(batch[data.instruction_field], inputs)]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(batch[data.output_field], add_special_tokens=False)["input_ids"]
    out = {"input_ids": [], "labels": []}
    for prompt, response in zip(prompt_ids, response_ids):
        prefix = bos + prompt
        if len(prefix) >= data.max_length:
            continue
        out["input_ids"].append((prefix + response + eos)[:data.max_length])
        out["labels"].append(([IGNORE_INDEX] * len(prefix) + response + eos)[:data.max_length])
    return out


def encode_classification(batch: dict, *, tokenizer, cfg: Config) -> dict:
    """Text with the tokenizer's own special tokens, truncated; rows that encode to nothing are dropped."""
    ids = tokenizer(batch[cfg.data.text_field], truncation=True, max_length=cfg.data.max_length)["input_ids"]
    keep = [i for i, x in enumerate(ids) if x]
    return {"input_ids": [ids[i] for i in keep], "labels": [batch[cfg.data.label_field][i] for i in keep]}


ENCODERS = {"text": encode_text, "instruction": encode_instruction, "classification": encode_classification,
            "chat": encode_chat}
