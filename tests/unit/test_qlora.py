"""QLoRA: clear errors without CUDA; merging into an unquantised 16-bit base and generating on the model's device
(checked on CPU); a real 4-bit LoRA run, generation and merge on a GPU (marked gpu)."""
import pytest
import torch
from safetensors.torch import load_file

from helpers import dist_tune
from dist_tune import evaluate
from dist_tune.cli import main
from dist_tune.config import dump_config, load_config
from dist_tune.errors import UserError
from dist_tune.export import unquantised_base
from dist_tune.models import load_model, load_tokenizer
from dist_tune.peft import apply_peft


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_qlora_without_cuda_is_a_clear_error():
    cfg = load_config(None, {"peft.method": "lora", "peft.load_in_4bit": True})
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        load_model(cfg, load_tokenizer(cfg))


@pytest.mark.parametrize("dtype, merged", [("auto", "bfloat16"), ("float32", "bfloat16"), ("bfloat16", "bfloat16"),
                                           ("float16", "float16")])
def test_the_merge_base_of_a_qlora_run_is_unquantised_in_its_compute_dtype(dtype, merged):
    cfg = load_config(None, {"peft.method": "lora", "peft.load_in_4bit": True, "model.dtype": dtype})
    base = unquantised_base(cfg)
    assert (base.peft.load_in_4bit, base.model.dtype) == (False, merged)
    assert cfg.peft.load_in_4bit  # the run's own config is untouched
    plain = load_config(None, {"peft.method": "lora"})
    assert unquantised_base(plain) is plain


def qlora_run_dir(tmp_path):
    """A finished QLoRA run as `dist-tune train` leaves it (config.yaml + final/ adapter), built without a GPU."""
    cfg = load_config(None, {"model.name_or_path": "tiny-llama"})
    tokenizer = load_tokenizer(cfg)
    base = tmp_path / "base"
    load_model(cfg, tokenizer).save_pretrained(base)
    tokenizer.save_pretrained(base)
    cfg = load_config(None, {"model.name_or_path": str(base), "peft.method": "lora", "peft.load_in_4bit": True,
                             "model.dtype": "float32", "engine.mixed_precision": "bf16"})
    run_dir = tmp_path / "run"
    torch.manual_seed(1)
    model = apply_peft(load_model(load_config(None, {"model.name_or_path": str(base), "peft.method": "lora"}),
                                  tokenizer), cfg)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a non-zero update, so merging changes the weights
    model.save_pretrained(run_dir / "final")
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    return run_dir, base


def test_merge_adapter_of_a_qlora_run_merges_into_a_16bit_unquantised_base(tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir, base = qlora_run_dir(tmp_path)
    main(["merge-adapter", str(run_dir)])  # no 4-bit load, so no GPU or bitsandbytes needed
    merged = run_dir / "merged"
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(merged)
    assert {t.dtype for t in load_file(merged / "model.safetensors").values()} == {torch.bfloat16}
    ids = torch.arange(1, 17).reshape(2, 8)
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16),
                                         run_dir / "final").eval()
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits.float()
        expected = unmerged(ids).logits.float()
        assert not torch.allclose(logits, plain(ids).logits.float(), atol=1e-2)  # the adapter is in there
    assert torch.allclose(logits, expected, atol=5e-2), (logits - expected).abs().max()


def test_generate_moves_the_prompt_to_the_models_device(tmp_path, monkeypatch):
    """A QLoRA base sits on its GPU while the tokenizer makes CPU tensors; `meta` stands in for the GPU here."""
    cfg = load_config(None, {})
    seen = {}

    class OnAnotherDevice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.empty(1, device="meta"))

        def generate(self, input_ids, attention_mask, **kwargs):
            seen["devices"] = {input_ids.device.type, attention_mask.device.type}
            return torch.zeros(1, input_ids.shape[1] + 2, dtype=torch.long)

    monkeypatch.setattr(evaluate, "load_trained", lambda run_dir: (cfg, OnAnotherDevice(), load_tokenizer(cfg)))
    evaluate.generate_text(tmp_path, "Say hi", max_new_tokens=2)
    assert seen["devices"] == {"meta"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs CUDA")
def test_qlora_trains_generates_and_merges(tmp_path):
    pytest.importorskip("bitsandbytes")
    cfg = load_config(None, {"model.name_or_path": "small-llama"})
    base = tmp_path / "base"
    load_model(cfg, load_tokenizer(cfg)).save_pretrained(base)
    load_tokenizer(cfg).save_pretrained(base)
    dist_tune("train", f"--model.name_or_path={base}", "--peft.method=lora", "--peft.load_in_4bit=true",
              "--train.max_steps=5", "--log.wandb.mode=disabled", f"--train.output_dir={tmp_path}",
              "--train.run_name=qlora")
    run_dir = tmp_path / "qlora"
    assert (run_dir / "final" / "adapter_model.safetensors").is_file()
    assert dist_tune("generate", str(run_dir), "Say hi", "--max_new_tokens=4").returncode == 0
    dist_tune("merge-adapter", str(run_dir))
    assert {t.dtype for t in load_file(run_dir / "merged" / "model.safetensors").values()} == {torch.bfloat16}
