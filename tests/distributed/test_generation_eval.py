"""Generation evaluation while training on sharded engines (2 gloo ranks): every rank decodes its share with the
sharded model, and the answers (text by text) and metrics equal what one device generates from the final model."""
from __future__ import annotations

import json

import pytest

from helpers import TINY, dist_tune, read_metrics

KEYS = ("eval/exact_match", "eval/bleu", "eval/rouge1", "eval/rouge2", "eval/rougeL")
WORDS = "apple river stone cloud dragon violin tiger lamp music paper window rabbit ocean garden bread pencil".split()


def recital_rows(n: int = 12) -> list[dict]:
    """'Recite list i.' -> a fixed list of 1-3 words: a mapping a 2-layer model memorises within a hundred steps on
    any CPU, so its answers are right words (not luck of a CPU's rounding) and the comparison is not '' == ''."""
    return [{"instruction": f"Recite list {i}.",
             "output": " ".join(WORDS[(5 * i + 3 * j) % len(WORDS)] for j in range(1 + i % 3))} for i in range(n)]


def write_jsonl(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# Margins measured with train.seed 1, 2 and 3 on an AVX2-only AMD EPYC: zero3-full reaches exact match 1.0 at step
# 100 in all three; fsdp-lora (LoRA on q, v and the head) 1.0, 1.0 and 0.56 at step 200 (ROUGE-1 1.0, 1.0, 0.6).
@pytest.mark.slow
@pytest.mark.parametrize("engine, steps, min_exact_match", [
    (["--engine.kind=fsdp", "--peft.method=lora", "--peft.target_modules=[q_proj,v_proj,lm_head]", "--optim.lr=3e-2"],
     200, 0.25),
    (["--engine.kind=deepspeed", "--engine.zero_stage=3", "--optim.lr=5e-3"], 100, 0.5),
], ids=["fsdp-lora", "zero3-full"])
def test_sharded_engines_generate_what_one_device_generates_from_the_final_model(engine, steps, min_exact_match,
                                                                                   runs_root, tmp_path):
    name = f"gen-{engine[0].split('=')[1]}"
    run_dir = runs_root / name
    rows = recital_rows()
    # 9 prompts in micro-batches of 4 are 3 batches: rank 0 decodes two, rank 1 one and a discarded filler
    dist_tune("train", *TINY, *engine, f"--data.path={write_jsonl(tmp_path / 'train.jsonl', rows * 20)}",
              f"--data.validation_path={write_jsonl(tmp_path / 'validation.jsonl', rows[:9])}",
              f"--train.max_steps={steps}", f"--train.eval_steps={steps // 2}", "--eval.generate_samples=9",
              "--eval.max_new_tokens=8", f"--train.output_dir={runs_root}", f"--train.run_name={name}", nproc=2)
    final = {key: read_metrics(run_dir, key)[steps] for key in KEYS}
    sharded = read_jsonl(run_dir / "generations.jsonl")  # the second eval replaced the first
    assert [row["reference"] for row in sharded] == [row["output"] for row in rows[:9]]
    assert final["eval/exact_match"] >= min_exact_match, sharded
    assert len({row["output"] for row in sharded}) >= 3, sharded  # answers differ from prompt to prompt

    single = json.loads(dist_tune("eval", str(run_dir), "--generate").stdout.strip().splitlines()[-1])
    assert read_jsonl(run_dir / "generations.jsonl") == sharded  # prompt, reference and answer, row by row
    assert single["eval/exact_match"] == final["eval/exact_match"]
    for key in KEYS[1:]:
        assert single[key] == pytest.approx(final[key], abs=1e-6), key
