"""Generation evaluation while training on sharded engines (2 gloo ranks): every rank decodes its share with the
sharded model, and the metrics equal what one device computes from the final model."""
from __future__ import annotations

import json

import pytest

from helpers import TINY, dist_tune, read_metrics

KEYS = ("eval/exact_match", "eval/bleu", "eval/rouge1", "eval/rouge2", "eval/rougeL")


@pytest.mark.slow
@pytest.mark.parametrize("engine", [
    ["--engine.kind=fsdp", "--peft.method=lora", "--optim.lr=3e-2"],
    ["--engine.kind=deepspeed", "--engine.zero_stage=3", "--optim.lr=5e-3"],
], ids=["fsdp-lora", "zero3-full"])
def test_sharded_engines_generate_what_one_device_generates_from_the_final_model(engine, runs_root):
    name = f"gen-{engine[0].split('=')[1]}"
    run_dir = runs_root / name
    # 9 prompts in micro-batches of 4 are 3 batches: rank 0 decodes two, rank 1 one and a discarded filler
    dist_tune("train", *TINY, *engine, "--train.max_steps=300", "--train.eval_steps=150",
              "--eval.generate_samples=9", "--eval.max_new_tokens=8", f"--train.output_dir={runs_root}",
              f"--train.run_name={name}", nproc=2)
    final = {key: read_metrics(run_dir, key)[300] for key in KEYS}
    assert final["eval/rouge1"] > 0  # the model answers with some right words: the comparison is not 0 == 0
    assert len((run_dir / "generations.jsonl").read_text().splitlines()) == 9  # the second eval replaced the first
    single = json.loads(dist_tune("eval", str(run_dir), "--generate").stdout.strip().splitlines()[-1])
    assert single["eval/exact_match"] == final["eval/exact_match"]
    for key in KEYS[1:]:
        assert single[key] == pytest.approx(final[key], abs=1e-6), key
