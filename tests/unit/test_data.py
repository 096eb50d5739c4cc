"""Data layer: sources, formats, masking, packing, labels, collation, sampler resume."""
from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from dist_tune.config import Config
from dist_tune.data.collate import make_collator
from dist_tune.data.formats import prompt_for
from dist_tune.data.loader import build_loader
from dist_tune.data.pipeline import build_datasets
from dist_tune.data.sampler import ResumableSampler
from dist_tune.data.sources import load_records
from dist_tune.errors import DataError

TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "dist_tune" / "assets" / "tokenizer"
INSTRUCTIONS = [
    {"instruction": "Reverse the order of the words.", "input": "apple river stone", "output": "stone river apple"},
    {"instruction": "What is 3 plus 4?", "input": "", "output": "7"},
    {"instruction": "Repeat the word sun 3 times.", "input": "", "output": "sun sun sun"},
    {"instruction": "Sort these letters alphabetically.", "input": "d b a", "output": "a b d"},
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris"},
]
DOCS = ["The small dog ran to the river.", "Tom has 3 apples.", "It was sunny in the garden, so Mia stayed there.",
        "Hi.", "The capital of Peru is Lima. The opposite of hot is cold. Ben and Leo sang in the forest together."]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def make_cfg(tmp_path: Path, path: str, fmt: str = "instruction", **data) -> Config:
    cfg = Config()
    cfg.data.path, cfg.data.format, cfg.data.cache_dir, cfg.data.validation_split = path, fmt, str(tmp_path / "c"), 0.0
    if fmt == "classification":
        cfg.model.task = "classification"
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def test_tokenizer_asset(tok):
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert tok("a b")["input_ids"] == tok("a b", add_special_tokens=False)["input_ids"]
    assert tok.decode(tok("Paris is nice.")["input_ids"]) == "Paris is nice."
    assert sum(p.stat().st_size for p in TOKENIZER_DIR.iterdir()) < 500_000


def test_bundled_sources():
    sizes = {name: len(load_records(f"bundled:{name}")) for name in ("instructions", "text", "sentiment", "chat")}
    assert sizes == {"instructions": 3000, "text": 2000, "sentiment": 1200, "chat": 300}
    labels = load_records("bundled:sentiment")["label"]
    assert set(labels) == {"negative", "positive"} and list(labels).count("positive") == 660
    with pytest.raises(DataError, match="bundled:instructions"):
        load_records("bundled:nope")


def test_instruction_masking(tmp_path, tok):
    cfg = make_cfg(tmp_path, write_jsonl(tmp_path / "d.jsonl", INSTRUCTIONS))
    train, val = build_datasets(cfg, tok)
    assert val is None and len(train) == len(INSTRUCTIONS)
    for row, record in zip(train, INSTRUCTIONS):
        ids, labels = row["input_ids"], row["labels"]
        n_prompt = 1 + len(tok(prompt_for(cfg, record["instruction"], record["input"]))["input_ids"])
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert labels[:n_prompt] == [-100] * n_prompt
        assert labels[n_prompt:] == ids[n_prompt:]
        assert tok.decode(labels[n_prompt:]) == record["output"] + "</s>"


def test_prompt_templates(tmp_path):
    cfg = make_cfg(tmp_path, "bundled:instructions", prompt_template="plain")
    assert prompt_for(cfg, "Add.", "1 and 2") == "Add.\n1 and 2\n"
    assert prompt_for(cfg, "Add 1 and 2.") == "Add 1 and 2.\n"
    cfg.data.prompt_template = "alpaca"
    assert prompt_for(cfg, "Go.").endswith("### Instruction:\nGo.\n\n### Response:\n")
    assert "### Input:\nx\n\n### Response:\n" in prompt_for(cfg, "Go.", "x")
    cfg.data.prompt_template = "Q: {instruction} {input}\nA: "
    assert prompt_for(cfg, "Go.", "x") == "Q: Go. x\nA: "
    cfg.data.prompt_template = "chatml"
    with pytest.raises(DataError, match="data.prompt_template"):
        build_datasets(cfg, None)


def test_instruction_truncation_keeps_mask_and_drops_lost_responses(tmp_path, tok):
    rows = [{"instruction": "Repeat.", "input": "", "output": " ".join(["sun"] * 40)},
            {"instruction": "word " * 30, "input": "", "output": "x"}]
    cfg = make_cfg(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows), prompt_template="plain", max_length=24)
    train, _ = build_datasets(cfg, tok)
    assert len(train) == 1  # the second prompt alone fills max_length
    ids, labels = train[0]["input_ids"], train[0]["labels"]
    n_prompt = 1 + len(tok("Repeat.\n")["input_ids"])
    assert len(ids) == len(labels) == 24 and ids[-1] != tok.eos_token_id
    assert labels[:n_prompt] == [-100] * n_prompt and labels[n_prompt:] == ids[n_prompt:]


def test_empty_after_filtering(tmp_path, tok):
    cfg = make_cfg(tmp_path, write_jsonl(tmp_path / "d.jsonl", INSTRUCTIONS), max_length=8)
    with pytest.raises(DataError, match="no usable rows.*data.max_length"):
        build_datasets(cfg, tok)


def _expected_docs(tok):
    return [[tok.bos_token_id] + tok(d)["input_ids"] + [tok.eos_token_id] for d in DOCS]


def test_text_packing(tmp_path, tok):
    cfg = make_cfg(tmp_path, write_jsonl(tmp_path / "t.jsonl", [{"text": d} for d in DOCS]), "text",
                   pack=True, max_length=16)
    train, _ = build_datasets(cfg, tok)
    docs = _expected_docs(tok)
    stream = [t for d in docs for t in d]
    blocks = [row["input_ids"] for row in train]
    assert [len(b) for b in blocks[:-1]] == [16] * (len(blocks) - 1) and 0 < len(blocks[-1]) <= 16
    assert [t for b in blocks for t in b] == stream
    assert all(row["labels"] == row["input_ids"] for row in train)
    starts = {sum(len(d) for d in docs[:i]) for i in range(len(docs))} | set(range(0, len(stream), 16))
    flat_pos = [p for row in train for p in row["position_ids"]]
    for i, pos in enumerate(flat_pos):
        assert pos == (0 if i in starts else flat_pos[i - 1] + 1)


def test_text_without_packing_truncates(tmp_path, tok):
    cfg = make_cfg(tmp_path, write_jsonl(tmp_path / "t.jsonl", [{"text": d} for d in DOCS]), "text", max_length=10)
    train, _ = build_datasets(cfg, tok)
    assert [row["input_ids"] for row in train] == [d[:10] for d in _expected_docs(tok)]
    assert "position_ids" not in train.column_names


def test_instruction_packing(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", INSTRUCTIONS)
    unpacked, _ = build_datasets(make_cfg(tmp_path, path, prompt_template="plain", max_length=32), tok)
    packed, _ = build_datasets(make_cfg(tmp_path, path, prompt_template="plain", max_length=32, pack=True), tok)
    assert [len(row["input_ids"]) for row in packed] == [17 + 10, 18, 15 + 11]  # next fit, no splitting
    segments = []
    for row in packed:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        assert row["position_ids"] == [p for a, b in zip(starts, starts[1:]) for p in range(b - a)]
        segments += [(row["input_ids"][a:b], row["labels"][a:b]) for a, b in zip(starts, starts[1:])]
    assert segments == [(row["input_ids"], row["labels"]) for row in unpacked]


def test_validation_split_is_seeded(tmp_path, tok):
    cfg = make_cfg(tmp_path, "bundled:instructions", validation_split=0.1)
    train, val = build_datasets(cfg, tok)
    assert (len(train), len(val)) == (2700, 300)
    again = build_datasets(cfg, tok)[1]
    assert again["input_ids"][:] == val["input_ids"][:] and again.cache_files == val.cache_files
    cfg.train.seed += 1
    assert build_datasets(cfg, tok)[1]["input_ids"][:] != val["input_ids"][:]


def test_classification_labels(tmp_path, tok):
    rows = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}, {"text": "meh", "label": "pos"}]
    cfg = make_cfg(tmp_path, write_jsonl(tmp_path / "c.jsonl", rows), "classification")
    train, _ = build_datasets(cfg, tok)
    assert train.features["labels"].names == ["neg", "pos"] and train["labels"][:] == [1, 0, 1]
    cfg.data.label_names = ["pos", "neg"]
    assert build_datasets(cfg, tok)[0]["labels"][:] == [0, 1, 0]
    cfg.data.label_names = None
    cfg.data.validation_path = write_jsonl(tmp_path / "v.jsonl", [{"text": "ok", "label": "pos"},
                                                                   {"text": "hm", "label": "neutral"}])
    with pytest.raises(DataError, match=r"row 2 of .*v\.jsonl.*'neutral'.*data\.label_names"):
        build_datasets(cfg, tok)


def test_classification_out_of_range_and_regression(tmp_path, tok):
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": 1}, {"text": "c", "label": 2}]
    cfg = make_cfg(tmp_path, write_jsonl(tmp_path / "c.jsonl", rows), "classification")
    with pytest.raises(DataError, match=r"row 3 .* label 2.*model\.num_labels"):
        build_datasets(cfg, tok)
    cfg.model.num_labels = 3
    assert build_datasets(cfg, tok)[0]["labels"][:] == [0, 1, 2]
    cfg.data.label_names, cfg.model.num_labels = ["x", "y", "z"], 2
    with pytest.raises(DataError, match="set model.num_labels=3"):
        build_datasets(cfg, tok)
    cfg.model.task, cfg.data.label_names = "regression", None
    train, _ = build_datasets(cfg, tok)
    batch = make_collator(cfg, tok)([train[0], train[2]])
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [0.0, 2.0]


def test_malformed_jsonl_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl' line 4 is not valid JSON"):
        load_records(str(path))
    path.write_text('{"text": "a"}\n["not", "an", "object"]\n')
    with pytest.raises(DataError, match="line 2 is a list"):
        load_records(str(path))


def test_missing_field_file_and_empty(tmp_path, tok):
    cfg = make_cfg(tmp_path, write_jsonl(tmp_path / "d.jsonl", [{"prompt": "x", "output": "y"}]))
    with pytest.raises(DataError, match=r"no field 'instruction'.*set data\.instruction_field"):
        build_datasets(cfg, tok)
    with pytest.raises(DataError, match=r"data file 'missing\.jsonl' not found; set data\.path"):
        load_records("missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="has no rows"):
        load_records(str(tmp_path / "empty.jsonl"))
    cfg = make_cfg(tmp_path, write_jsonl(tmp_path / "n.jsonl", [{"text": 1}]), "text")
    with pytest.raises(DataError, match="holds int64 values, not text; set data.text_field"):
        build_datasets(cfg, tok)


def test_parquet_csv_and_disk_sources(tmp_path):
    source = datasets.Dataset.from_list(INSTRUCTIONS)
    source.to_parquet(str(tmp_path / "d.parquet"))
    source.to_csv(str(tmp_path / "d.csv"), index=False)
    source.save_to_disk(str(tmp_path / "disk"))
    datasets.DatasetDict({"train": source, "validation": source.select([0])}).save_to_disk(str(tmp_path / "dd"))
    for path in ("d.parquet", "d.csv", "disk"):
        assert load_records(str(tmp_path / path)).to_list() == INSTRUCTIONS
    assert len(load_records(str(tmp_path / "dd"), split="validation")) == 1
    with pytest.raises(DataError, match="holds splits train, validation"):
        load_records(str(tmp_path / "dd"))


def test_sampler_resume_matches_uninterrupted_epoch():
    for world_size in (1, 2):
        for rank in range(world_size):
            def batches(sampler):
                return [b.tolist() for b in DataLoader(list(range(103)), batch_size=4, sampler=sampler, drop_last=True)]
            sampler = ResumableSampler(103, shuffle=True, seed=7, rank=rank, world_size=world_size)
            sampler.set_epoch(3)
            full = batches(sampler)
            assert len(full) == (103 // world_size) // 4
            sampler.set_epoch(3, consumed=5 * 4 * world_size)
            assert len(sampler) == 103 // world_size - 20
            assert full[:5] + batches(sampler) == full
            sampler.set_epoch(4)
            assert batches(sampler) != full


def test_sampler_rank_shares():
    shares = []
    for rank in range(3):
        sampler = ResumableSampler(20, shuffle=True, seed=1, rank=rank, world_size=3)
        shares.append(list(sampler))
    assert [len(s) for s in shares] == [6, 6, 6] and len(set(sum(shares, []))) == 18
    shares = [list(ResumableSampler(20, shuffle=False, seed=1, rank=r, world_size=3, drop_last=False))
              for r in range(3)]
    assert shares[0] == [0, 3, 6, 9, 12, 15, 18] and sorted(sum(shares, [])) == list(range(20))
    assert list(ResumableSampler(5, shuffle=True, seed=1)) == list(ResumableSampler(5, shuffle=True, seed=1))


def test_collator_padding(tok):
    cfg = Config()
    cfg.data.padding_free = False
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 1, 0]},
            {"input_ids": [8], "labels": [8], "position_ids": [0]}]
    batch = make_collator(cfg, tok)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 0], [0, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())
    cfg.model.task = "classification"
    batch = make_collator(cfg, tok)([{"input_ids": [5, 6], "labels": 1}, {"input_ids": [7], "labels": 0}])
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.long and "position_ids" not in batch


def test_build_loader(tmp_path, tok):
    cfg = make_cfg(tmp_path, "bundled:sentiment", "classification", validation_split=0.1)
    cfg.train.micro_batch_size = 16
    train, val = build_datasets(cfg, tok)
    loader, sampler = build_loader(train, cfg, tok, rank=0, world_size=2, shuffle=True, seed=3)
    assert len(loader) == (len(train) // 2) // 16 and next(iter(loader))["input_ids"].shape[0] == 16
    seen = []
    for rank in range(2):
        loader, _ = build_loader(val, cfg, tok, rank=rank, world_size=2, shuffle=False, seed=3)
        seen += [n for batch in loader for n in batch["labels"].tolist()]
    assert len(seen) == len(val) == 120 and sum(seen) == sum(val["labels"])
    with pytest.raises(DataError, match="train.micro_batch_size"):
        build_loader(val.select(range(10)), cfg, tok, rank=0, world_size=1, shuffle=True, seed=3)



def test_padding_free_collator_concatenates_rows_with_boundaries(tok):
    cfg = Config()
    assert cfg.data.padding_free == "auto"  # the default: on for causal-LM rows
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, -100]},
            {"input_ids": [4, 5, 6, 7], "labels": [-100, -100, 6, 7]}]
    batch = make_collator(cfg, tok)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 4, 5, 6, 7]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, -100, -100, -100, 6, 7]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert batch["attention_mask"].tolist() == [[1] * 9]
    assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == [0, 3, 5, 9]
    assert batch["max_length_q"] == batch["max_length_k"] == 4
    assert batch["logits_to_keep"].tolist() == [0, 1, 6, 7]  # no target crosses from one example into the next
    cfg.train.target_logits_only = False
    assert "logits_to_keep" not in make_collator(cfg, tok)(rows)


def test_packed_rows_are_flattened_at_their_example_boundaries(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", INSTRUCTIONS)
    cfg = make_cfg(tmp_path, path, prompt_template="plain", max_length=32, pack=True)
    packed, _ = build_datasets(cfg, tok)
    batch = make_collator(cfg, tok)([packed[0], packed[1]])
    lengths = [len(packed[0]["input_ids"]), len(packed[1]["input_ids"])]
    assert batch["input_ids"].shape == (1, sum(lengths))
    starts = [i for i, p in enumerate(packed[0]["position_ids"] + packed[1]["position_ids"]) if p == 0]
    assert batch["cu_seq_lens_q"].tolist() == starts + [sum(lengths)] and len(starts) == 3

def test_packed_rows_match_separate_examples_in_a_model(tmp_path, tok):
    """transformers reads segment boundaries from position_ids only with attention_mask=None and no cache."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = write_jsonl(tmp_path / "d.jsonl", INSTRUCTIONS)
    unpacked, _ = build_datasets(make_cfg(tmp_path, path, prompt_template="plain", max_length=32), tok)
    packed, _ = build_datasets(make_cfg(tmp_path, path, prompt_template="plain", max_length=32, pack=True), tok)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    cfg = Config()
    cfg.data.padding_free = False
    cfg.train.target_logits_only = False  # every position's logits
    collate = make_collator(cfg, tok)
    batch = collate([packed[0], packed[1]])  # the second row is shorter: padding must not disturb the first
    del batch["attention_mask"]
    with torch.no_grad():
        joint = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        first = model(**{k: v for k, v in collate([unpacked[0]]).items() if k != "labels"}).logits[0]
        second = model(**{k: v for k, v in collate([unpacked[1]]).items() if k != "labels"}).logits[0]
    assert torch.allclose(joint, torch.cat([first, second]), atol=1e-5)


def _pack_in_memory(rows: list[list[int]], max_length: int, split_examples: bool) -> list[dict]:
    """The packing every rank did in memory before packing streamed: the reference the streamed rows must equal."""
    flat = [t for row in rows for t in row]
    example_starts, offset = set(), 0
    for row in rows:
        example_starts.add(offset)
        offset += len(row)
    if split_examples:
        row_starts = list(range(0, len(flat), max_length))
    else:
        row_starts, fill, offset = [], max_length, 0
        for row in rows:
            if fill + len(row) > max_length:
                row_starts.append(offset)
                fill = 0
            fill += len(row)
            offset += len(row)
    packed = []
    for start, end in zip(row_starts, row_starts[1:] + [len(flat)]):
        positions, segment = [], start
        for i in range(start, end):
            segment = i if i in example_starts else segment
            positions.append(i - segment)
        packed.append({"input_ids": flat[start:end], "labels": [-t for t in flat[start:end]],
                       "position_ids": positions})
    return packed


@pytest.mark.parametrize("split_examples", [True, False], ids=["text", "instruction"])
@pytest.mark.parametrize("chunk_tokens", [1, 7, 50, 1 << 22])
def test_streamed_packing_equals_packing_in_memory(tmp_path, monkeypatch, split_examples, chunk_tokens):
    from dist_tune.data import packing

    monkeypatch.setattr(packing, "CHUNK_TOKENS", chunk_tokens)
    generator = torch.Generator().manual_seed(chunk_tokens)
    max_length = 16
    limit = 40 if split_examples else max_length  # instruction examples are truncated to max_length
    rows = [list(range(1 + i * 100, 1 + i * 100 + int(n))) for i, n in
            enumerate(torch.randint(1, limit + 1, (60,), generator=generator))]
    dataset = datasets.Dataset.from_dict({"input_ids": rows, "labels": [[-t for t in row] for row in rows]})
    packed = packing.pack(dataset, max_length, split_examples=split_examples, path=tmp_path / "packed.arrow")
    assert packed.cache_files == [{"filename": str(tmp_path / "packed.arrow")}]  # memory-mapped from the file
    assert packed.to_list() == _pack_in_memory(rows, max_length, split_examples)
    assert not list(tmp_path.glob("*.tmp"))
