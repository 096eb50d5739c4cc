"""data.sources mixtures: shares by weight, determinism, exact resume, validation union, config and bad input."""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

from dist_tune.config import ConfigError, config_from_dict, dump_config, load_config
from dist_tune.data.loader import build_loader
from dist_tune.data.pipeline import build_datasets
from dist_tune.data.mixture import Mixture, draws
from dist_tune.errors import DataError

TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "dist_tune" / "assets" / "tokenizer"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    rows = {
        "ins.jsonl": [{"instruction": f"What is {i} plus 1?", "output": str(i + 1)} for i in range(60)],
        "chat.jsonl": [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant",
                                                                               "content": str(i)}]}
                       for i in range(20)],
        "text.jsonl": [{"text": f"The number {i} comes after {i - 1}."} for i in range(30)],
    }
    for name, records in rows.items():
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def mixed_config(files: Path, *sources: dict, seed: int = 42, **data):
    overrides = {"data.sources": json.dumps([{**s, "path": str(files / s["path"])} for s in sources]),
                 "data.cache_dir": str(files / "cache"), "data.validation_split": 0.0, "train.seed": seed,
                 "train.micro_batch_size": 4}
    return load_config(None, {**overrides, **{f"data.{k}": v for k, v in data.items()}})


INS_CHAT = ({"path": "ins.jsonl", "weight": 1}, {"path": "chat.jsonl", "format": "chat", "weight": 3})


def epoch_order(train: Mixture, cfg, tok, epoch: int, rank: int = 0, world_size: int = 1) -> list[int]:
    _, sampler = build_loader(train, cfg, tok, rank=rank, world_size=world_size, shuffle=True, seed=cfg.train.seed)
    sampler.set_epoch(epoch)
    return list(sampler)


def test_epoch_shares_follow_the_weights_and_the_larger_source_continues_next_epoch(files, tok, caplog):
    cfg = mixed_config(files, *INS_CHAT)
    with caplog.at_level(logging.INFO, logger="dist_tune.data.pipeline"):
        train, val = build_datasets(cfg, tok)
    assert (train.sizes, train.draws, val) == ((60, 20), (20, 60), None)  # an epoch = 80 rows, split 1:3
    assert f"data.sources[1] {files / 'chat.jsonl'} (chat, weight 3): 20 rows, 60 per epoch (75.0%)" in caplog.messages
    seen_ins = Counter()
    for epoch in range(3):
        order = epoch_order(train, cfg, tok, epoch)
        from_chat = [i for i in order if i >= 60]
        assert len(order) == 80 and len(from_chat) == 60
        assert Counter(from_chat) == Counter(list(range(60, 80)) * 3)  # the small source: 3 full passes per epoch
        seen_ins.update(i for i in order if i < 60)
    assert seen_ins == Counter(range(60))  # the large source: 20 new rows per epoch, all 60 over 3 epochs
    rows = train.__getitems__(order[:2])
    assert set(rows[0]) == {"input_ids", "labels"}


def test_largest_remainder_keeps_the_epoch_size():
    assert draws([10, 10, 10], [1, 1, 1]) == [10, 10, 10]
    assert draws([7, 2], [2, 1]) == [6, 3]
    assert sum(draws([101, 33, 5], [0.2, 0.7, 0.1])) == 139


def test_order_is_a_function_of_seed_and_epoch(files, tok):
    cfg = mixed_config(files, *INS_CHAT)
    first, again = build_datasets(cfg, tok)[0], build_datasets(cfg, tok)[0]
    assert epoch_order(first, cfg, tok, 0) == epoch_order(again, cfg, tok, 0)
    assert epoch_order(first, cfg, tok, 0) != epoch_order(first, cfg, tok, 1)
    other = mixed_config(files, *INS_CHAT, seed=7)
    assert epoch_order(build_datasets(other, tok)[0], other, tok, 0) != epoch_order(first, cfg, tok, 0)


def test_resumed_sampler_continues_on_exactly_the_next_rows(files, tok):
    cfg = mixed_config(files, *INS_CHAT)
    train, _ = build_datasets(cfg, tok)
    for rank in range(2):
        loader, sampler = build_loader(train, cfg, tok, rank=rank, world_size=2, shuffle=True, seed=42)
        sampler.set_epoch(1)
        full = list(sampler)
        sampler.set_epoch(1, consumed=3 * 4 * 2)
        assert full[:12] + list(sampler) == full and len(full) == 40


def test_text_instruction_and_chat_mix_when_packed_and_validation_is_their_union(files, tok):
    cfg = mixed_config(files, {"path": "ins.jsonl"}, {"path": "text.jsonl", "format": "text"},
                       {"path": "chat.jsonl", "format": "chat", "weight": 2}, pack=True, validation_split=0.1,
                       prompt_template="plain",
                       max_length=64)
    train, val = build_datasets(cfg, tok)
    assert set(train.rows.column_names) == {"input_ids", "labels", "position_ids"}
    assert train.draws == (5, 5, 11)  # weights count rows as trained: packed rows here (sizes 9, 6, 6)
    examples = sum(positions.count(0) for positions in val["position_ids"])
    assert examples == 6 + 3 + 2  # a tenth of 60, 30 and 20 held out
    order = epoch_order(train, cfg, tok, 0)
    assert all(len(train[i]["input_ids"]) <= 64 for i in order[:10])


def test_per_source_validation_path(files, tok):
    cfg = mixed_config(files, {"path": "ins.jsonl", "validation_path": str(files / "ins.jsonl")},
                       {"path": "chat.jsonl", "format": "chat"}, validation_split=0.25)
    train, val = build_datasets(cfg, tok)
    assert train.sizes == (60, 15) and len(val) == 60 + 5


def test_sources_round_trip_through_the_run_config(files):
    cfg = mixed_config(files, *INS_CHAT)
    saved = yaml.safe_load(dump_config(cfg))
    assert saved["data"]["sources"] == [{"path": str(files / "ins.jsonl"), "weight": 1.0},
                                        {"path": str(files / "chat.jsonl"), "weight": 3.0, "format": "chat"}]
    assert config_from_dict(saved) == cfg


@pytest.mark.parametrize("sources, message", [
    ("[{path: a.jsonl, wieght: 2}]", "unknown config key 'data.sources[0].wieght'; did you mean 'weight'?"),
    ("[{path: a.jsonl}, {weight: 2}]", "data.sources[1] has no path; give every source a path (a file, directory, "
                                       "hf:NAME or bundled:NAME)"),
    ("[{path: a.jsonl, weight: 0}]", "data.sources[0].weight is 0; give every source a weight > 0"),
    ("[{path: a.jsonl, weight: -1}]", "data.sources[0].weight is -1; give every source a weight > 0"),
    ("[{path: a.jsonl, format: sharegpt}]", "data.sources[0].format is 'sharegpt'; choose one of text, instruction, "
                                            "classification, chat"),
    ("{path: a.jsonl}", "config key 'data.sources' expects a list of mappings, e.g. [{path: a.jsonl, weight: 3}], "
                        "got {'path': 'a.jsonl'}"),
    ("[{path: a.jsonl, format: classification}]", "data.format=classification needs model.task=classification or "
                                                  "regression"),
])
def test_bad_sources_are_one_line_errors(sources, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, {"data.sources": sources})
    assert str(err.value) == message


def test_top_level_validation_path_with_sources_is_refused():
    with pytest.raises(ConfigError, match=r"^data.validation_path does not apply to data.sources; set "
                                          r"validation_path on each source instead$"):
        load_config(None, {"data.sources": "[{path: a.jsonl}]", "data.validation_path": "v.jsonl"})


def test_a_missing_source_file_names_its_key(files, tok):
    cfg = mixed_config(files, {"path": "ins.jsonl"}, {"path": "nope.jsonl"})
    with pytest.raises(DataError, match=r"^data file '.*nope.jsonl' not found; set data.sources\[1\].path to "):
        build_datasets(cfg, tok)


def test_classification_sources_must_share_their_classes(tok, tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n')
    (tmp_path / "b.jsonl").write_text('{"text": "fine", "label": "pos"}\n{"text": "meh", "label": "neutral"}\n')
    cfg = load_config(None, {"model.task": "classification", "model.num_labels": 3, "data.format": "classification",
                             "data.sources": f"[{{path: {tmp_path / 'a.jsonl'}}}, {{path: {tmp_path / 'b.jsonl'}}}]",
                             "data.validation_split": 0, "data.cache_dir": str(tmp_path / "c")})
    with pytest.raises(DataError, match=r"^data.sources have different classes \('.*a.jsonl': neg, pos; '.*b.jsonl': "
                                        r"neutral, pos\); set data.label_names to the full list$"):
        build_datasets(cfg, tok)
    cfg.data.label_names = ["neg", "neutral", "pos"]
    train, _ = build_datasets(cfg, tok)
    assert train.rows.features["labels"].names == ["neg", "neutral", "pos"]
    assert sorted(train.rows["labels"]) == [0, 1, 2, 2]
