"""QLoRA: a clear error without CUDA; a real 4-bit LoRA step on a GPU (marked gpu)."""
import pytest
import torch

from helpers import dist_tune
from dist_tune.config import load_config
from dist_tune.errors import UserError
from dist_tune.models import load_model, load_tokenizer


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_qlora_without_cuda_is_a_clear_error():
    cfg = load_config(None, {"peft.method": "lora", "peft.load_in_4bit": True})
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        load_model(cfg, load_tokenizer(cfg))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs CUDA")
def test_qlora_trains_a_4bit_base_with_lora(tmp_path):
    pytest.importorskip("bitsandbytes")
    cfg = load_config(None, {"model.name_or_path": "small-llama"})
    base = tmp_path / "base"
    load_model(cfg, load_tokenizer(cfg)).save_pretrained(base)
    load_tokenizer(cfg).save_pretrained(base)
    dist_tune("train", f"--model.name_or_path={base}", "--peft.method=lora", "--peft.load_in_4bit=true",
              "--engine.mixed_precision=bf16", "--train.max_steps=5", "--log.wandb.mode=disabled",
              f"--train.output_dir={tmp_path}", "--train.run_name=qlora")
    assert (tmp_path / "qlora" / "final" / "adapter_model.safetensors").is_file()
