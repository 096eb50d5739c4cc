"""The chat format: conversation rows (OpenAI `messages` or ShareGPT `conversations`), rendered through the
tokenizer's chat template, with labels on the turns `data.train_on` selects."""
from __future__ import annotations

import logging

import datasets
import jinja2

from dist_tune.config import Config
from dist_tune.errors import DataError
from dist_tune.loss import IGNORE

log = logging.getLogger(__name__)

ROW = "row"
MESSAGES = "messages"
MESSAGE_FIELDS = ("messages", "conversations")
# role names of both styles (OpenAI `role`, ShareGPT `from`) mapped to the template's three roles
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
# ChatML's layout with the tokenizer's own bos/eos as the turn markers: <s>user\nHi</s><s>assistant\nHello</s>
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ (bos_token or '') + message['role'] + '\\n' + message['content'] | trim"
    " + eos_token }}{% endfor %}{% if add_generation_prompt %}{{ (bos_token or '') + 'assistant\\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer) -> None:
    """Give a tokenizer without a chat_template the default one (save_pretrained then writes it out)."""
    if tokenizer.chat_template is not None:
        return
    if tokenizer.eos_token is None:
        raise DataError("the tokenizer has neither a chat_template nor an eos token to end turns with; "
                        "use a tokenizer that defines chat_template (or eos_token)")
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    log.info("the tokenizer has no chat_template; using dist_tune's default (bos + role, content, eos per turn)")


def messages_field(cfg: Config, columns: list[str], source: str) -> str:
    """The column holding each row's turns: data.messages_field, or `messages` / `conversations` when auto."""
    wanted = MESSAGE_FIELDS if cfg.data.messages_field == "auto" else (cfg.data.messages_field,)
    found = [field for field in wanted if field in columns]
    if not found:
        raise DataError(f"data file '{source}' has no field {' or '.join(repr(f) for f in wanted)} (columns: "
                        f"{', '.join(columns)}); set data.messages_field to the column that holds each row's turns")
    return found[0]


def _turn(message: object, number: int, where: str) -> dict[str, str]:
    if not isinstance(message, dict):
        raise DataError(f"{where}: turn {number} is a {type(message).__name__}, not an object; write each turn as "
                        '{"role": ..., "content": ...} or {"from": ..., "value": ...}')
    role_key, content_key = ("role", "content") if message.get("role") is not None else ("from", "value")
    role, content = message.get(role_key), message.get(content_key)
    if role not in ROLES:
        raise DataError(f"{where}: turn {number} has {'no role' if role is None else f'role {role!r}'}; use "
                        "system, user or assistant (ShareGPT: system, human, gpt)")
    if not isinstance(content, str):
        raise DataError(f"{where}: turn {number} ({role}) has {type(content).__name__} {content_key}, not text; "
                        f"give every turn a string '{content_key}'")
    return {"role": ROLES[role], "content": content}


def conversation(value: object, row: int, source: str) -> list[dict[str, str]]:
    """A row's turns as [{role, content}] with roles system/user/assistant; a DataError naming the row if the
    row is not a conversation to learn from."""
    where = f"row {row} of '{source}'"
    if not isinstance(value, list) or not value:
        held = ("no conversation" if value is None else "an empty conversation" if value == []
                else f"a {type(value).__name__}, not a list of turns")
        raise DataError(f"{where} holds {held}; give every row a list of turns or remove the row")
    turns = [_turn(message, i, where) for i, message in enumerate(value, start=1)]
    roles = [turn["role"] for turn in turns]
    if "assistant" not in roles:
        raise DataError(f"{where} has no assistant turn, so there is nothing to learn; add one or remove the row")
    if roles[0] == "assistant":
        raise DataError(f"{where} starts with an assistant turn; start it with a user (or system) turn")
    return turns


def normalize(dataset: datasets.Dataset, cfg: Config, source: str) -> datasets.Dataset:
    """Check every row and keep only its turns (`messages`, OpenAI style) and its 1-based row number."""
    values = dataset.data.column(messages_field(cfg, dataset.column_names, source)).to_pylist()
    rows = [conversation(value, i, source) for i, value in enumerate(values, start=1)]
    return datasets.Dataset.from_dict({MESSAGES: rows, ROW: list(range(1, len(rows) + 1))})


def _target_turns(turns: list[dict[str, str]], train_on: str) -> list[int]:
    """Indices of the assistant turns that train_on=assistant or last_assistant makes targets."""
    assistants = [i for i, turn in enumerate(turns) if turn["role"] == "assistant"]
    return assistants[-1:] if train_on == "last_assistant" else assistants


def _render(tokenizer, turns: list[dict[str, str]], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)


def encode_conversation(tokenizer, turns: list[dict[str, str]], train_on: str, where: str) -> tuple[list, list]:
    """input_ids and labels of one conversation. A target turn's tokens are found by rendering the conversation
    up to it (with the generation prompt) and through it: both must be token prefixes of the whole rendering,
    which holds for any template that renders a turn the same whatever follows it."""
    targets = [] if train_on == "all" else _target_turns(turns, train_on)
    try:
        texts = [_render(tokenizer, turns)]
        for i in targets:
            texts += [_render(tokenizer, turns[:i], generation_prompt=True), _render(tokenizer, turns[:i + 1])]
    except jinja2.TemplateError as exc:
        raise DataError(f"{where}: the chat template rejects this conversation ({exc}); fix the row or use "
                        "a tokenizer whose template accepts it") from None
    full, *prefixes = tokenizer(texts, add_special_tokens=False)["input_ids"]
    if train_on == "all":
        return full, list(full)
    labels = [IGNORE] * len(full)
    for turn, start, end in zip(targets, prefixes[::2], prefixes[1::2]):
        if end[:len(start)] != start or full[:len(end)] != end:
            raise DataError(f"{where}: the chat template renders turn {turn + 1} differently once more turns "
                            "follow (not prefix-stable), so its tokens cannot be found; set data.train_on=all "
                            "or use a template that renders each turn the same whatever follows")
        labels[len(start):len(end)] = full[len(start):len(end)]
    return full, labels


def encode_chat(batch: dict, *, tokenizer, cfg: Config, source: str) -> dict:
    """Rendered conversations truncated to max_length; rows whose targets are all cut off are dropped."""
    limit = cfg.data.max_length
    out = {"input_ids": [], "labels": []}
    for turns, row in zip(batch[MESSAGES], batch[ROW]):
        ids, labels = encode_conversation(tokenizer, turns, cfg.data.train_on, f"row {row} of '{source}'")
        ids, labels = ids[:limit], labels[:limit]
        if any(label != IGNORE for label in labels):
            out["input_ids"].append(ids)
            out["labels"].append(labels)
    return out


def chat_prompt(tokenizer, instruction: str, input: str = "") -> str:
    """The text a chat model is prompted with: the instruction (and input) as one user turn, then the
    template's generation prompt."""
    ensure_chat_template(tokenizer)
    content = f"{instruction}\n{input}" if input else instruction
    return _render(tokenizer, [{"role": "user", "content": content}], generation_prompt=True)
