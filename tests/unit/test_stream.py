"""data.streaming: rows read, tokenized and packed on the fly equal the prepared rows, split across ranks, mixed
by weight, and resumed exactly from a saved place (across epoch ends too)."""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from dist_tune import checkpoint as ckpt
from dist_tune.config import Config, ConfigError, SourceConfig, apply_overrides
from dist_tune.data.collate import make_collator
from dist_tune.data.pipeline import build_datasets
from dist_tune.data.stream import build_stream_batches, train_stream
from dist_tune.errors import DataError, UserError

TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "dist_tune" / "assets" / "tokenizer"
WORDS = "the quick brown fox jumps over a lazy dog while seven red birds sing softly near old stone walls".split()


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def write_shards(root: Path, shards: int, rows: int, seed: int = 0, fmt: str = "text", tag: str = "") -> str:
    """`shards` JSONL files of `rows` records each, of random lengths; every record names its shard and row."""
    r = random.Random(seed)
    root.mkdir(parents=True)
    for s in range(shards):
        with (root / f"part-{s:02d}.jsonl").open("w") as handle:
            for i in range(rows):
                words = " ".join(r.choice(WORDS) for _ in range(r.randint(3, 40)))
                record = ({"text": f"{tag} s{s} r{i} {words}".strip()} if fmt == "text"
                          else {"instruction": f"s{s} r{i} repeat", "output": words})
                handle.write(json.dumps(record) + "\n")
    return str(root)


def stream_cfg(tmp_path: Path, path: str, fmt: str = "text", pack: bool = True, **train) -> Config:
    cfg = Config()
    cfg.data.path, cfg.data.format, cfg.data.pack, cfg.data.streaming = path, fmt, pack, True
    cfg.data.max_length, cfg.data.validation_split, cfg.data.cache_dir = 32, 0.0, str(tmp_path / "cache")
    cfg.data.prompt_template = "plain"
    cfg.train.max_steps, cfg.train.micro_batch_size = 10, 2
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def records(stream) -> list[tuple[int, ...]]:
    return [tuple(r["input_ids"]) for r in stream]


def batches_for(cfg: Config, tok, rank: int = 0, world: int = 1):
    return build_stream_batches(cfg, tok, make_collator(cfg, tok), rank, world)


@pytest.mark.parametrize("fmt", ["text", "instruction"])
def test_streamed_packed_rows_equal_the_prepared_packed_rows(tmp_path, tok, fmt):
    path = write_shards(tmp_path / "shards", 3, 25, fmt=fmt)
    cfg = stream_cfg(tmp_path, path, fmt)
    prepared_cfg = stream_cfg(tmp_path, path, fmt)
    prepared_cfg.data.streaming = False
    prepared, _ = build_datasets(prepared_cfg, tok)
    batches = batches_for(cfg, tok)
    rows = []
    while len(rows) < len(prepared) - 1:  # the last prepared row is the remainder the stream still holds open
        batches._refill()
        rows += list(batches.pending)
        batches.pending.clear()
    expected = [dict(prepared[i]) for i in range(len(rows))]
    assert len(rows) >= len(prepared) - 1 > 10
    assert rows == expected


@pytest.mark.parametrize("shards, split", [(4, "whole shards per rank (2 of 4 each)"), (3, "interleaved")])
def test_ranks_read_disjoint_shares_that_cover_the_stream(tmp_path, tok, caplog, shards, split):
    path = write_shards(tmp_path / "shards", shards, 10)
    cfg = stream_cfg(tmp_path, path, pack=False)
    caplog.set_level(logging.INFO, logger="dist_tune.data.stream")
    shares = [records(train_stream(cfg, tok, rank, 2)) for rank in (0, 1)]
    assert split in caplog.text
    everything = records(train_stream(cfg, tok, 0, 1))
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(everything) and len(everything) == shards * 10
    assert abs(len(shares[0]) - len(shares[1])) <= 10


@pytest.mark.parametrize("pack, stop_after, mixture", [(True, 11, False), (False, 23, False), (True, 9, True)])
def test_a_saved_place_resumes_on_exactly_the_next_batch(tmp_path, tok, pack, stop_after, mixture):
    """Stopped just before (packed) or after (plain) the end of an epoch: 40 short records give ~12 packed or 20
    plain batches; a 2:1 mixture of two such sources resumes its draw too."""
    path = write_shards(tmp_path / "shards", 2, 20)
    cfg = stream_cfg(tmp_path, path, pack=pack)
    if mixture:
        other = write_shards(tmp_path / "other", 1, 20, seed=5, tag="beta")
        cfg.data.sources = [SourceConfig(path=path, weight=2.0), SourceConfig(path=other, weight=1.0)]
    straight = batches_for(cfg, tok)
    expected = [straight.next_batch() for _ in range(stop_after + (40 if mixture else 12))]
    assert straight.epoch >= 1
    first = batches_for(cfg, tok)
    for _ in range(stop_after):
        first.next_batch()
    saved = first.state_dict()
    torch.save(saved, tmp_path / "state.pt")
    resumed = batches_for(cfg, tok)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for want in expected[stop_after:]:
        got = resumed.next_batch()
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(torch.as_tensor(got[key]), torch.as_tensor(want[key])), key


def test_a_mixture_streams_its_sources_by_weight(tmp_path, tok, caplog):
    a = write_shards(tmp_path / "a", 2, 200, seed=1, tag="alpha")
    b = write_shards(tmp_path / "b", 2, 200, seed=2, tag="beta")
    cfg = stream_cfg(tmp_path, a, pack=False)
    cfg.data.sources = [SourceConfig(path=a, weight=3.0), SourceConfig(path=b, weight=1.0)]
    caplog.set_level(logging.INFO, logger="dist_tune.data.stream")
    texts = [tok.decode(row["input_ids"], skip_special_tokens=True) for row, _ in
             zip(train_stream(cfg, tok, 0, 1), range(400))]
    assert f"data.sources[0] {a}: 75.0% of the records drawn" in caplog.text
    share = sum(text.startswith("alpha") for text in texts) / len(texts)
    assert sum(text.startswith("beta") for text in texts) == len(texts) - share * len(texts)
    assert 0.68 <= share <= 0.82


@pytest.mark.parametrize("change, message", [
    ({"train.max_steps": None}, "data.streaming reads rows as it trains, with no length to count epochs in; set "
                                "train.max_steps"),
    ({"data.num_workers": 2}, "data.streaming reads the stream in the training process; set data.num_workers=0"),
    ({"data.format": "classification", "model.task": "classification"},
     "data.streaming reads causal-LM formats (text, instruction, chat); classification needs every label before "
     "training; set data.streaming=false"),
])
def test_settings_a_stream_cannot_take_are_refused_in_one_line(change, message):
    with pytest.raises(ConfigError) as err:
        apply_overrides(Config(), {"data.streaming": True, "train.max_steps": 5, **change})
    assert str(err.value) == message


def test_a_streamed_record_without_the_text_field_names_it(tmp_path, tok):
    path = write_shards(tmp_path / "shards", 1, 5)
    cfg = stream_cfg(tmp_path, path, pack=False)
    cfg.data.text_field = "body"
    with pytest.raises(DataError) as err:
        batches_for(cfg, tok).next_batch()
    assert str(err.value) == (f"streamed records of '{path}' have no field 'body' (fields: text); set "
                              "data.text_field to the field that holds it")


def test_a_streamed_checkpoint_resumes_only_streamed_and_at_its_world_size(tmp_path):
    step = tmp_path / "step_00000004"
    step.mkdir()
    ckpt.write_state(step, ckpt.TrainState(step=4), world_size=2)
    torch.save({"epoch": 0}, step / ckpt.DATA_STATE.format(rank=0))
    ckpt.check_data_resume(step, streaming=True, world_size=2)
    with pytest.raises(UserError) as other_size:
        ckpt.check_data_resume(step, streaming=True, world_size=4)
    assert str(other_size.value) == (
        f"checkpoint {step} streamed its data on 2 ranks and a streamed run resumes only on as many (each rank's "
        "place is in its own share of the stream); run on 2 ranks, or use a new train.run_name")
    with pytest.raises(UserError) as prepared:
        ckpt.check_data_resume(step, streaming=False, world_size=2)
    assert str(prepared.value) == (f"checkpoint {step} was saved by a run with data.streaming=true; set "
                                   "data.streaming=true to resume it, or use a new train.run_name")
