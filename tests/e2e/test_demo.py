"""The demo (`dist-tune train`, no arguments) answers prompts it never trained on, and says so when it ends."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from dist_tune.cli import resolve_recipe
from dist_tune.config import load_config
from dist_tune.data.pipeline import build_datasets
from dist_tune.data.formats import prompt_for
from dist_tune.data.sources import load_records
from dist_tune.generation import first_samples, format_answers
from dist_tune.models import load_tokenizer
from helpers import cli_env


def demo_prompts(split) -> list[tuple[int, ...]]:
    return [tuple(sample.prompt) for sample in first_samples(split, len(split))]


def test_demo_holds_out_prompts_that_no_training_row_asks(tmp_path):
    cfg = load_config(resolve_recipe("demo"), {"data.cache_dir": str(tmp_path)})
    train, val = build_datasets(cfg, load_tokenizer(cfg))
    held_out, trained = demo_prompts(val), demo_prompts(train)
    assert (len(held_out), len(trained)) == (150, 2850)
    assert cfg.eval.generate_samples == len(held_out)  # the demo answers every held-out prompt
    assert set(held_out).isdisjoint(trained)


@pytest.mark.slow
def test_demo_prints_its_exact_match_on_unseen_prompts_and_three_answers(tmp_path):
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "dist_tune.cli", "train"], cwd=tmp_path, env=cli_env(),
                          capture_output=True, text=True, timeout=900)
    wall = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = re.search(r"^exact match on 150 held-out validation prompts: [\d.]+% \((\d+) of 150\)$", proc.stdout,
                      re.MULTILINE)
    assert match, proc.stdout[-3000:]
    print(f"demo: {match.group(0)} in {wall:.0f} s")
    assert int(match.group(1)) >= 75
    block = proc.stdout[match.end():].splitlines()[1:10]
    assert [line.split(":")[0].strip() for line in block] == ["prompt", "expected", "model"] * 3, block

    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    generations = [json.loads(line) for line in (tmp_path / summary["run_dir"] / "generations.jsonl").open()]
    cfg = load_config(resolve_recipe("demo"))
    rows = load_records(cfg.data.path).to_list()
    asked = [f"<s>{prompt_for(cfg, row['instruction'], row['input'])}" for row in rows]
    assert len(generations) == 150
    for generation in generations:  # each held-out prompt is its own row of the file, so in no training row
        assert asked.count(generation["prompt"]) == 1, generation


def test_answers_block_counts_exact_matches_and_shows_prompts_without_special_tokens():
    rows = [{"prompt": "<s>Reverse the order of the words.\nred blue\n", "reference": "blue red", "output": "blue red"},
            {"prompt": "<s>How many words are there?\napple\n", "reference": "1", "output": "2"}]
    assert format_answers(rows, ["<s>", "</s>"], shown=2) == (
        "exact match on 2 held-out validation prompts: 50.0% (1 of 2)\n"
        "  prompt:   Reverse the order of the words. | red blue\n"
        "  expected: blue red\n"
        "  model:    blue red  (right)\n"
        "  prompt:   How many words are there? | apple\n"
        "  expected: 1\n"
        "  model:    2  (wrong)")
