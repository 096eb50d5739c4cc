"""Generation evaluation: prompt/reference split of validation rows, batched greedy decoding, and metrics that
come from sacrebleu and rouge-score."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import sacrebleu
import torch
from rouge_score import rouge_scorer
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from dist_tune.config import Config
from dist_tune.data.formats import prompt_ids
from dist_tune.data.pipeline import build_datasets
from dist_tune.data.chat import ensure_chat_template
from dist_tune.generation import first_samples, generation_eval, generation_metrics, greedy_decode, split_example

TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "dist_tune" / "assets" / "tokenizer"
ROWS = [{"instruction": "Sort these letters.", "input": "c a b", "output": "a b c"},
        {"instruction": "What is the opposite of hot?", "input": "", "output": "cold"},
        {"instruction": "Repeat the word tea twice.", "input": "", "output": "tea tea"}]


@pytest.fixture
def tok():
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def validation_set(tmp_path: Path, tok, rows: list[dict], **data):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = Config()
    cfg.data.path = cfg.data.validation_path = str(path)
    cfg.data.cache_dir = str(tmp_path / "cache")
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg, build_datasets(cfg, tok)[1]


def test_exact_match_is_after_stripping_and_bleu_rouge_come_from_the_libraries():
    outputs, references = [" a b c\n", "hot", "the cat"], ["a b c", "cold", "the cat sat"]
    metrics = generation_metrics(outputs, references)
    assert metrics["eval/exact_match"] == pytest.approx(1 / 3)
    assert metrics["eval/bleu"] == sacrebleu.corpus_bleu(outputs, [references]).score
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    for kind in ("rouge1", "rouge2", "rougeL"):
        expected = sum(scorer.score(r, o)[kind].fmeasure for o, r in zip(outputs, references)) / 3
        assert metrics[f"eval/{kind}"] == pytest.approx(expected, abs=1e-12)
    # by hand: rouge1 F of "the cat" against "the cat sat" is 2·1·(2/3)/(1 + 2/3) = 0.8; the others are 1 and 0
    assert metrics["eval/rouge1"] == pytest.approx((1 + 0 + 0.8) / 3)
    assert generation_metrics(["a b c d"], ["a b c d"])["eval/bleu"] == pytest.approx(100.0)


@pytest.mark.parametrize("pack", [False, True])
def test_instruction_rows_split_into_the_training_prompt_and_the_output(tmp_path, tok, pack):
    cfg, val = validation_set(tmp_path, tok, ROWS, prompt_template="plain", pack=pack, padding_free=False)
    samples = first_samples(val, 5)
    assert len(samples) == 3
    for sample, row in zip(samples, ROWS):
        assert sample.prompt == prompt_ids(cfg, tok, row["instruction"], row["input"])
        assert sample.reference[-1] == tok.eos_token_id
        assert tok.decode(sample.reference, skip_special_tokens=True) == row["output"]
    assert first_samples(val, 2) == samples[:2]


def test_text_rows_have_no_prompt():
    assert split_example([1, 5, 6, 2], [1, 5, 6, 2]) is None
    assert split_example([1, 5, 6, 2], [-100, 5, 6, 2]).prompt == [1]


def test_chat_reference_is_the_last_assistant_turn_after_the_earlier_turns(tmp_path, tok):
    turns = [{"role": "user", "content": "What is 3 plus 4?"}, {"role": "assistant", "content": "7"},
             {"role": "user", "content": "Now add 2 to that."}, {"role": "assistant", "content": "9"}]
    _, val = validation_set(tmp_path, tok, [{"messages": turns}], format="chat")
    ensure_chat_template(tok)
    [sample] = first_samples(val, 1)
    history = tok.apply_chat_template(turns[:3], tokenize=False, add_generation_prompt=True)
    assert sample.prompt == tok(history, add_special_tokens=False)["input_ids"]
    assert tok.decode(sample.reference, skip_special_tokens=True) == "9"


def test_text_data_is_skipped_with_one_warning(tmp_path, tok, caplog):
    cfg, val = validation_set(tmp_path, tok, [{"text": "one two three"}] * 3, format="text")
    cfg.eval.generate_samples = 2
    with caplog.at_level(logging.WARNING, logger="dist_tune.metrics"):
        assert generation_eval(cfg, None, val, tok) == ({}, [])
        assert generation_eval(cfg, None, val, tok) == ({}, [])
    assert [r.getMessage() for r in caplog.records] == [
        "eval.generate_samples=2 skipped: data.format=text has no prompt/response pairs; generation metrics are "
        "for instruction and chat data"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def hf_greedy(model, prompt: list[int], new_tokens: int, eos: int | None) -> list[int]:
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0)
    tokens = out[0, len(prompt):].tolist()
    return tokens[:tokens.index(eos)] if eos in tokens else tokens


@pytest.mark.parametrize("incremental", [True, False])
def test_batched_left_padded_greedy_decoding_matches_transformers_generate(model, incremental):
    prompts = [[3, 17, 5, 9, 22, 41, 8], [12, 4], [30, 30, 1, 7]]
    free = hf_greedy(model, prompts[0], 6, None)
    stop = free[2]  # prompt 0 meets this stop token at its third new token
    decoded = greedy_decode(lambda inputs: model(**inputs), prompts, max_new_tokens=6, pad_id=0, stop_ids={stop},
                            device=torch.device("cpu"), incremental=incremental)
    assert decoded == [hf_greedy(model, p, 6, stop) for p in prompts]
    assert decoded[0] == free[:free.index(stop)]
