"""The chat format: conversation rows, the chat template, assistant-only labels, bad rows, truncation, packing
and the generation prompt."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from dist_tune.config import Config, ConfigError, load_config
from dist_tune.data.collate import make_collator
from dist_tune.data.formats import prompt_ids
from dist_tune.data.pipeline import build_datasets
from dist_tune.data.sources import load_records
from dist_tune.data.chat import DEFAULT_CHAT_TEMPLATE, chat_prompt
from dist_tune.errors import DataError

TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "dist_tune" / "assets" / "tokenizer"
SYSTEM = {"role": "system", "content": "You are a careful assistant."}
PAIRS = [("What is 3 plus 4?", "7"), ("Now add 2 to that.", "9"), ("Reverse the words.\nred green blue",
                                                                    "blue green red")]
OPENAI = {"messages": [SYSTEM] + [{"role": r, "content": c} for q, a in PAIRS for r, c in (("user", q),
                                                                                            ("assistant", a))]}
SHAREGPT = {"conversations": [{"from": "system", "value": "Answer briefly."},
                              {"from": "human", "value": "What is the capital of France?"},
                              {"from": "gpt", "value": "Paris"},
                              {"from": "human", "value": "Write that in capital letters."},
                              {"from": "gpt", "value": "PARIS"},
                              {"from": "user", "value": "How many words is that?"},
                              {"from": "assistant", "value": "1"}]}
SECOND = {"messages": [{"role": {"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]), "content": t["value"]}
                       for t in SHAREGPT["conversations"]]}
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture
def tok():
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def chat_cfg(tmp_path: Path, path: str, **data) -> Config:
    cfg = Config()
    cfg.data.path, cfg.data.format, cfg.data.cache_dir, cfg.data.validation_split = path, "chat", str(tmp_path / "c"), 0
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def target_runs(row: dict) -> list[list[int]]:
    """The label values of each maximal run of target (non -100) positions."""
    runs, previous = [], -100
    for label in row["labels"]:
        if label != -100:
            if previous == -100:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return runs


def assistant_contents(row: dict) -> list[str]:
    turns = row.get("messages") or row["conversations"]
    return [t.get("content", t.get("value")) for t in turns if t.get("role", t.get("from")) in ("assistant", "gpt")]


@pytest.mark.parametrize("train_on", ["assistant", "last_assistant"])
def test_targets_decode_to_exactly_the_assistant_turns_and_their_end_of_turn(tmp_path, tok, train_on):
    rows = [OPENAI, SHAREGPT]
    for row in rows:
        path = write_jsonl(tmp_path / f"{len(row)}{next(iter(row))}.jsonl", [row])
        (encoded,), _ = build_datasets(chat_cfg(tmp_path, path, train_on=train_on), tok)
        assert encoded["labels"] == [x if y != -100 else -100 for x, y in zip(encoded["input_ids"], encoded["labels"])]
        expected = [f"{content}</s>" for content in assistant_contents(row)]
        assert [tok.decode(run) for run in target_runs(encoded)] == (expected if train_on == "assistant"
                                                                     else expected[-1:])


def test_train_on_all_labels_the_whole_rendering(tmp_path, tok):
    (encoded,), _ = build_datasets(chat_cfg(tmp_path, write_jsonl(tmp_path / "d.jsonl", [OPENAI]), train_on="all"),
                                   tok)
    assert encoded["labels"] == encoded["input_ids"]
    assert tok.decode(encoded["input_ids"]) == (
        "<s>system\nYou are a careful assistant.</s><s>user\nWhat is 3 plus 4?</s><s>assistant\n7</s>"
        "<s>user\nNow add 2 to that.</s><s>assistant\n9</s>"
        "<s>user\nReverse the words.\nred green blue</s><s>assistant\nblue green red</s>")


def test_every_bundled_conversation_masks_to_its_assistant_turns(tmp_path, tok):
    cfg = chat_cfg(tmp_path, "bundled:chat", max_length=512)
    train, _ = build_datasets(cfg, tok)
    records = load_records("bundled:chat").to_list()
    assert len(train) == len(records) == 300
    for row, record in zip(train, records):
        assert [tok.decode(run) for run in target_runs(row)] == [f"{c}</s>" for c in assistant_contents(record)]


def test_default_template_is_set_and_saved_with_the_tokenizer(tmp_path, tok):
    assert tok.chat_template is None
    build_datasets(chat_cfg(tmp_path, write_jsonl(tmp_path / "d.jsonl", [OPENAI])), tok)
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    tok.save_pretrained(tmp_path / "saved")
    assert AutoTokenizer.from_pretrained(tmp_path / "saved").chat_template == DEFAULT_CHAT_TEMPLATE


def test_the_tokenizers_own_template_is_used(tmp_path, tok):
    tok.chat_template = CHATML
    (encoded,), _ = build_datasets(chat_cfg(tmp_path, write_jsonl(tmp_path / "d.jsonl", [OPENAI])), tok)
    assert tok.decode(encoded["input_ids"]).startswith("<|im_start|>system\nYou are a careful assistant.<|im_end|>\n")
    assert [tok.decode(run) for run in target_runs(encoded)] == ["7<|im_end|>\n", "9<|im_end|>\n",
                                                                  "blue green red<|im_end|>\n"]
    assert tok.chat_template == CHATML


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path, tok):
    # like reasoning templates that drop the thoughts of every assistant turn but the last
    tok.chat_template = CHATML.replace("message['content']", "(message['content'] if loop.last else '...')")
    cfg = chat_cfg(tmp_path, write_jsonl(tmp_path / "d.jsonl", [OPENAI]))
    with pytest.raises(DataError, match=r"row 1 of .*d\.jsonl': the chat template renders turn 3 differently once more "
                                        r"turns follow .*set data\.train_on=all"):
        build_datasets(cfg, tok)
    cfg.data.train_on = "all"
    assert len(build_datasets(cfg, tok)[0]) == 1


@pytest.mark.parametrize("bad, message", [
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}]},
     r"row 2 of '.*d\.jsonl': turn 2 has role 'bot'; use system, user or assistant \(ShareGPT: system, human, gpt\)"),
    ({"messages": []}, r"row 2 of '.*d\.jsonl' holds an empty conversation; give every row a list of turns"),
    ({"other": 1}, r"row 2 of '.*d\.jsonl' holds no conversation; give every row a list of turns"),
    ({"messages": [SYSTEM, {"role": "user", "content": "Hi"}]},
     r"row 2 of '.*d\.jsonl' has no assistant turn, so there is nothing to learn; add one or remove the row"),
    ({"messages": [{"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Hi"}]},
     r"row 2 of '.*d\.jsonl' starts with an assistant turn; start it with a user \(or system\) turn"),
])
def test_bad_rows_name_the_row_and_the_fix(tmp_path, tok, bad, message):
    cfg = chat_cfg(tmp_path, write_jsonl(tmp_path / "d.jsonl", [OPENAI, bad]))
    with pytest.raises(DataError, match=message):
        build_datasets(cfg, tok)


def test_content_that_is_not_text_and_a_missing_conversation_column(tmp_path, tok):
    row = {"conversations": [{"from": "human", "value": ["Hi"]}, {"from": "gpt", "value": ["Hello"]}]}
    with pytest.raises(DataError, match=r"row 1 of '.*d\.jsonl': turn 1 \(human\) has list value, not text; give "
                                        r"every turn a string 'value'"):
        build_datasets(chat_cfg(tmp_path, write_jsonl(tmp_path / "d.jsonl", [row])), tok)
    with pytest.raises(DataError, match=r"has no field 'messages' or 'conversations' \(columns: chat\); set "
                                        r"data\.messages_field to the column that holds each row's turns"):
        build_datasets(chat_cfg(tmp_path, write_jsonl(tmp_path / "d.jsonl", [{"chat": OPENAI["messages"]}])), tok)


def test_messages_field_names_another_column(tmp_path, tok):
    row = {"dialogue": OPENAI["messages"], "messages": "not this one"}
    train, _ = build_datasets(chat_cfg(tmp_path, write_jsonl(tmp_path / "d.jsonl", [row]),
                                       messages_field="dialogue"), tok)
    assert [tok.decode(run) for run in target_runs(train[0])] == ["7</s>", "9</s>", "blue green red</s>"]


def first_target(row: dict) -> int:
    return next(i for i, label in enumerate(row["labels"]) if label != -100)


def test_truncation_keeps_labels_aligned_and_drops_rows_left_without_targets(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [OPENAI, SECOND])
    full, _ = build_datasets(chat_cfg(tmp_path, path, max_length=512), tok)
    assert [first_target(row) for row in full] == [39, 36] and len(full[1]["input_ids"]) > 38
    (cut,), _ = build_datasets(chat_cfg(tmp_path, path, max_length=38), tok)  # OPENAI's answers are all cut off
    assert cut["input_ids"] == full[1]["input_ids"][:38] and cut["labels"] == full[1]["labels"][:38]
    assert [tok.decode(run) for run in target_runs(cut)] == ["Paris</s>"]  # the later answers are cut off
    with pytest.raises(DataError, match="no usable rows after tokenization"):
        build_datasets(chat_cfg(tmp_path, path, max_length=36), tok)


def test_packed_and_padding_free_chat_rows_keep_their_labels(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [OPENAI, SECOND, OPENAI])
    unpacked, _ = build_datasets(chat_cfg(tmp_path, path, max_length=200), tok)
    packed, _ = build_datasets(chat_cfg(tmp_path, path, max_length=200, pack=True), tok)
    assert [len(row["input_ids"]) for row in packed] == [93 + 85, 93]
    segments = []
    for row in packed:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        segments += [(row["input_ids"][a:b], row["labels"][a:b]) for a, b in zip(starts, starts[1:])]
    assert segments == [(row["input_ids"], row["labels"]) for row in unpacked]
    cfg = chat_cfg(tmp_path, path, padding_free=True)
    batch = make_collator(cfg, tok)(list(unpacked))
    assert batch["labels"][0].tolist() == [label for row in unpacked for label in row["labels"]]


def test_generation_prompt_is_the_template_rendering_of_a_user_turn(tmp_path, tok):
    cfg = chat_cfg(tmp_path, "bundled:chat")
    assert chat_prompt(tok, "What is 3 plus 4?") == "<s>user\nWhat is 3 plus 4?</s><s>assistant\n"
    assert chat_prompt(tok, "Add the numbers.", "2 and 3") == "<s>user\nAdd the numbers.\n2 and 3</s><s>assistant\n"
    ids = prompt_ids(cfg, tok, "What is 3 plus 4?")
    assert ids == tok("<s>user\nWhat is 3 plus 4?</s><s>assistant\n", add_special_tokens=False)["input_ids"]
    assert ids.count(tok.bos_token_id) == 2 and ids[0] == tok.bos_token_id
    row = {"messages": [{"role": "user", "content": "What is 3 plus 4?"}, {"role": "assistant", "content": "7"}]}
    (trained,), _ = build_datasets(chat_cfg(tmp_path, write_jsonl(tmp_path / "d.jsonl", [row])), tok)
    first_target = next(i for i, label in enumerate(trained["labels"]) if label != -100)
    assert trained["input_ids"][:first_target] == ids  # generation sees exactly what training put before answers
    other = copy.deepcopy(tok)
    other.chat_template = CHATML
    assert chat_prompt(other, "Hi") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_train_on_takes_only_its_three_values():
    assert load_config(overrides={"data.format": "chat", "data.train_on": "last_assistant"}).data.train_on == \
        "last_assistant"
    with pytest.raises(ConfigError, match="config key 'data.train_on' is 'user'; choose one of assistant, "
                                          "last_assistant, all"):
        load_config(overrides={"data.format": "chat", "data.train_on": "user"})
