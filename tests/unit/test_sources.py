"""Record sources beyond single files: `hf:NAME` from a real on-disk hub cache with no network, and directories
of parquet/jsonl shards."""
from __future__ import annotations

import json
from pathlib import Path

import datasets
import huggingface_hub
import pytest
from transformers import AutoTokenizer

from dist_tune.config import Config
from dist_tune.data.pipeline import build_datasets
from dist_tune.data.sources import load_records
from dist_tune.data.stream import train_stream
from dist_tune.errors import DataError

TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "dist_tune" / "assets" / "tokenizer"
REVISION = "0123456789abcdef0123456789abcdef01234567"
README = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: validation
    path: data/validation-*
- config_name: short
  data_files:
  - split: train
    path: short/*.parquet
---
"""


def chats(prefix: str, n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"{prefix} question {i}?"},
                          {"role": "assistant", "content": f"{prefix} answer {i}"}]} for i in range(n)]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline hub cache holding dataset `acme/chats` the way `hf download --repo-type dataset` lays it out."""
    repo = tmp_path / "hub" / "datasets--acme--chats"
    snapshot = repo / "snapshots" / REVISION
    (snapshot / "data").mkdir(parents=True)
    (snapshot / "short").mkdir()
    (snapshot / "README.md").write_text(README)
    datasets.Dataset.from_list(chats("train", 6)).to_parquet(str(snapshot / "data/train-00000-of-00001.parquet"))
    datasets.Dataset.from_list(chats("val", 2)).to_parquet(str(snapshot / "data/validation-00000-of-00001.parquet"))
    datasets.Dataset.from_list(chats("short", 3)).to_parquet(str(snapshot / "short/part.parquet"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    return tmp_path


def cfg_for(tmp_path: Path, path: str, fmt: str = "chat", **data) -> Config:
    cfg = Config()
    cfg.data.path, cfg.data.format, cfg.data.cache_dir, cfg.data.validation_split = path, fmt, str(tmp_path / "c"), 0
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def questions(dataset: datasets.Dataset) -> list[str]:
    return [row["messages"][0]["content"] for row in dataset]


def test_hub_dataset_resolves_offline_from_the_hub_cache(hub):
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    cfg = cfg_for(hub, "hf:acme/chats", validation_path="hf:acme/chats")
    train, val = build_datasets(cfg, tok)
    assert (len(train), len(val)) == (6, 2)
    assert tok.decode(val[1]["input_ids"]) == "<s>user\nval question 1?</s><s>assistant\nval answer 1</s>"
    again, _ = build_datasets(cfg, tok)
    assert again.cache_files == train.cache_files  # the tokenized rows come from dist_tune's cache
    assert questions(load_records("hf:acme/chats", split="validation")) == ["val question 0?", "val question 1?"]
    assert questions(load_records("hf:acme/chats", split="train[:2]")) == ["train question 0?", "train question 1?"]
    assert questions(load_records("hf:acme/chats", config="short")) == [f"short question {i}?" for i in range(3)]
    assert len(load_records("hf:acme/chats", data_files=["data/validation-*.parquet"])) == 2


def test_hub_dataset_errors_name_the_dataset_and_the_fix(hub):
    with pytest.raises(DataError, match=r"^dataset 'acme/missing' is not in the local cache and HF_HUB_OFFLINE "
                                        r"\(or HF_DATASETS_OFFLINE\) is set; run `hf download --repo-type dataset "
                                        r"acme/missing` where there is network, or set HF_HUB_OFFLINE=0$"):
        load_records("hf:acme/missing")
    with pytest.raises(DataError, match=r"^dataset 'acme/chats' cannot be loaded: Unknown split \"test\".*check "
                                        r"data\.config, data\.split and data\.data_files$"):
        load_records("hf:acme/chats", split="test")
    with pytest.raises(DataError, match=r"^dataset 'acme/chats' cannot be loaded: .*'nope'"):
        load_records("hf:acme/chats", config="nope")


def write_shard(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_shard_directory_reads_every_shard_in_sorted_order(tmp_path, suffix):
    shards = tmp_path / "shards"
    for name, texts in (("part-00002", ["e"]), ("part-00000", ["a", "b"]), ("sub/part-00003", ["f"]),
                        ("part-00001", ["c", "d"]), (".cache/stale", ["x"])):
        write_shard(shards / f"{name}{suffix}", [{"text": t} for t in texts])
    assert load_records(str(shards))["text"][:] == ["a", "b", "c", "d", "e", "f"]
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    train, _ = build_datasets(cfg_for(tmp_path, str(shards), "text"), tok)
    assert [tok.decode(row["input_ids"]) for row in train] == [f"<s>{t}</s>" for t in "abcdef"]


def test_shard_directory_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"directory '.*empty' holds no \.jsonl/\.json/\.parquet/\.csv shards and is "
                                        r"not a datasets save_to_disk directory; set data\.path to"):
        load_records(str(tmp_path / "empty"))
    write_shard(tmp_path / "mixed/a.jsonl", [{"text": "a"}])
    write_shard(tmp_path / "mixed/b.parquet", [{"text": "b"}])
    with pytest.raises(DataError, match=r"directory '.*mixed' mixes \.jsonl and \.parquet files; keep one kind"):
        load_records(str(tmp_path / "mixed"))
    write_shard(tmp_path / "clash/a.jsonl", [{"text": "a"}])
    write_shard(tmp_path / "clash/b.jsonl", [{"text": 1}])
    with pytest.raises(DataError, match=r"shard '.*clash/b\.jsonl' does not match the columns of '.*clash/a\.jsonl'"):
        load_records(str(tmp_path / "clash"))


def test_local_files_are_memory_mapped_arrow_and_their_errors_name_the_fix(tmp_path):
    write_shard(tmp_path / "ok.jsonl", [{"text": "a"}, {"text": "b"}])
    records = load_records(str(tmp_path / "ok.jsonl"), cache_dir=str(tmp_path / "cache"))
    assert records["text"][:] == ["a", "b"]
    assert [Path(f["filename"]).is_relative_to(tmp_path / "cache") for f in records.cache_files] == [True]
    cases = {
        "mixed.jsonl": ('{"text": "a"}\n{"text": 3}\n', r"mixes value types within column 'text'; give every row"),
        "item.json": ('[{"text": "a"}, 3]', r"item 1 is a int, not a JSON object"),
        "broken.parquet": ("PAR1 not really parquet", r"cannot be read as parquet: .*; fix the file or set data.path"),
        "blank.jsonl": ("\n\n", r"has no rows; set data.path to a non-empty dataset"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=rf"^data file '.*{name}' .*{message}") as raised:
            load_records(str(tmp_path / name), cache_dir=str(tmp_path / "cache"))
        assert "\n" not in str(raised.value)

    (tmp_path / "latin1.jsonl").write_bytes('{"text": "caf\u00e9 au lait"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"^data file '.*latin1\.jsonl' is not UTF-8 text \(invalid continuation "
                                        r"byte: byte 0xe9\); re-encode it as UTF-8$"):
        build_datasets(cfg_for(tmp_path, str(tmp_path / "latin1.jsonl"), "text"),
                       AutoTokenizer.from_pretrained(str(TOKENIZER_DIR)))


def test_hub_dataset_streams_offline_the_rows_it_would_prepare(hub):
    """data.streaming on `hf:acme/chats`: the chat rows as the prepared path encodes them, in order; validation
    from the dataset's validation split, prepared."""
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    cfg = cfg_for(hub, "hf:acme/chats", validation_path="hf:acme/chats")
    prepared, _ = build_datasets(cfg, tok)
    cfg.data.streaming = True
    train, val = build_datasets(cfg, tok)
    assert train is None and len(val) == 2
    streamed = [dict(row) for row in train_stream(cfg, tok, 0, 1)]
    assert streamed == [dict(row) for row in prepared]
