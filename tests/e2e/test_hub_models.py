"""A model named by Hugging Face Hub id, through the real CLI with HF_HUB_OFFLINE=1 and a hub cache on disk:
train (2 ranks: each node's local rank 0 resolves first), eval and merge-adapter of the run resolve it again."""
from __future__ import annotations

import pytest

import json

import yaml

from dist_tune.config import load_config
from dist_tune.data.chat import DEFAULT_CHAT_TEMPLATE
from dist_tune.models import load_model, load_tokenizer
from helpers import TINY, dist_tune, hub_snapshot, read_metrics


@pytest.mark.slow
def test_train_eval_and_merge_a_lora_chat_run_from_a_cached_hub_id(tmp_path):
    cache = tmp_path / "hub"
    cfg = load_config(None, {"model.name_or_path": "tiny-llama", "model.dtype": "float32"})
    snapshot = hub_snapshot(cache, "acme/tiny")
    load_model(cfg, load_tokenizer(cfg)).save_pretrained(snapshot)
    load_tokenizer(cfg).save_pretrained(snapshot)
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus 1?"},
                          {"role": "assistant", "content": str(i + 1)}]} for i in range(40)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    env = {"HF_HUB_CACHE": str(cache)}

    dist_tune("train", *TINY, "--model.name_or_path=acme/tiny", "--model.dtype=float32", "--data.format=chat",
              f"--data.path={data}", "--peft.method=lora", "--train.max_steps=2", "--log.log_steps=1",
              "--engine.kind=ddp", f"--train.output_dir={tmp_path}", "--train.run_name=hub", nproc=2, env=env)
    run_dir = tmp_path / "hub"
    assert len(read_metrics(run_dir)) == 2
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["name_or_path"] == "acme/tiny"

    scores = json.loads(dist_tune("eval", str(run_dir), env=env).stdout.strip().splitlines()[-1])
    assert scores["eval/loss"] > 0
    merged = dist_tune("merge-adapter", str(run_dir), env=env).stdout.strip().splitlines()[-1]
    assert (tmp_path / "hub" / "merged" / "chat_template.jinja").read_text() == DEFAULT_CHAT_TEMPLATE
    assert merged == str(run_dir / "merged")


def test_an_uncached_hub_id_offline_stops_with_one_line(tmp_path):
    runs = tmp_path / "runs"
    proc = dist_tune("train", *TINY, "--model.name_or_path=acme/absent", f"--train.output_dir={runs}", check=False,
                     env={"HF_HUB_CACHE": str(tmp_path / "hub")})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"dist-tune: error: model 'acme/absent' is not in the Hugging Face cache ({tmp_path / 'hub'}) and "
        "HF_HUB_OFFLINE is set; run `hf download acme/absent` where there is network, or set HF_HUB_OFFLINE=0")
