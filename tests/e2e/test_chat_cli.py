"""A chat run through the real CLI: trains on conversation rows, saves the chat template with the model, and
`generate` prompts through that template."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dist_tune.data.chat import DEFAULT_CHAT_TEMPLATE
from helpers import TINY, dist_tune, read_metrics


@pytest.mark.slow
def test_chat_run_trains_saves_its_template_and_generates_through_it(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "Answer briefly."},
                          {"role": "user", "content": f"What is {i} plus 1?"},
                          {"role": "assistant", "content": str(i + 1)},
                          {"role": "user", "content": "Now add 2 to that."},
                          {"role": "assistant", "content": str(i + 3)}]} for i in range(40)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    dist_tune("train", *TINY, "--data.format=chat", f"--data.path={data}", "--train.max_steps=6",
              "--optim.lr=1e-2", "--log.log_steps=1", f"--train.output_dir={tmp_path}", "--train.run_name=chat")
    run_dir = tmp_path / "chat"
    assert len(read_metrics(run_dir)) == 6
    assert (run_dir / "final" / "chat_template.jinja").read_text() == DEFAULT_CHAT_TEMPLATE

    text = dist_tune("generate", str(run_dir), "--prompt", "What is 7 plus 1?", "--max_new_tokens", "6").stdout
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 7 plus 1?"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == "<s>user\nWhat is 7 plus 1?</s><s>assistant\n"
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final").eval()
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    assert text.rstrip("\n") == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("case", ["bad_row", "uncached_hub_dataset"])
def test_bad_chat_rows_and_uncached_hub_datasets_stop_before_training_with_one_line(tmp_path, case):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    path, expected = {
        "bad_row": (str(data), f"dist-tune: error: row 1 of '{data}' has no assistant turn, so there is nothing to "
                               "learn; add one or remove the row"),
        "uncached_hub_dataset": ("hf:acme/absent", "dist-tune: error: dataset 'acme/absent' is not in the local "
                                                   "cache and HF_HUB_OFFLINE (or HF_DATASETS_OFFLINE) is set; run `hf "
                                                   "download --repo-type dataset acme/absent` where there is network, "
                                                   "or set HF_HUB_OFFLINE=0"),
    }[case]
    runs = tmp_path / "runs"
    proc = dist_tune("train", *TINY, "--data.format=chat", f"--data.path={path}", f"--train.output_dir={runs}",
                     check=False, env={"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_DATASETS_CACHE": str(tmp_path)})
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == expected
    assert "Traceback" not in proc.stderr and not any(runs.rglob("*"))
