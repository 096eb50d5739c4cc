"""Bad input through the real CLI entry (`dist_tune.cli.main`, in-process to save start-up time): exit code 2,
exactly one `dist-tune: error:` line (the last line of stderr) naming the problem and the fix, no traceback,
and nothing written to the run directory. Plus the inputs that look bad but must be handled (no pad token)."""
from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from pathlib import Path

import pytest

from helpers import TINY, TINY_OVERRIDES
from dist_tune import logs
from dist_tune.cli import main
from dist_tune.config import Config
from dist_tune.engines.deepspeed import ds_config
from dist_tune.errors import UserError

ERROR = "dist-tune: error:"
INFO_LOG = re.compile(r"\d\d:\d\d:\d\d INFO dist_tune")
INSTRUCTIONS = [{"instruction": f"Reverse the words number {i}.", "input": "red green blue", "output": "blue green red"}
                for i in range(40)]


@pytest.fixture(autouse=True)
def cli_env(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                "SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_PROCID", "WANDB_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    yield
    if logs._handler is not None:  # the log handler was pointed at this test's captured stderr
        logs._handler.stream = sys.__stderr__  # no flush: capsys closed it


@pytest.fixture
def cli(capsys, tmp_path):
    """cli(*args) -> (exit code, stdout, stderr) of `dist-tune ARGS` run in this process."""
    def run(*args: str) -> tuple[int, str, str]:
        logs.rank_logging(0)
        logs._handler.stream = sys.stderr  # log records land in the captured stderr, like the real CLI's
        code = 0
        try:
            main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err
    return run


def base(tmp_path: Path, *extra: str, config: str | Path = "demo") -> list[str]:
    """`dist-tune train CONFIG` shrunk by TINY_OVERRIDES to two steps, writing under tmp_path."""
    return ["train", str(config), *TINY_OVERRIDES, "--train.max_steps=2", f"--train.output_dir={tmp_path / 'runs'}",
            f"--data.cache_dir={tmp_path / 'cache'}", *extra]


def assert_user_error(result: tuple[int, str, str], tmp_path: Path, *needles: str, after_tokenizing: bool = False) -> str:
    """Exit 2, one error line with every needle in it, no traceback, no run dir written. stderr is exactly that
    line after any INFO log lines (e.g. why data.padding_free=auto is off), except that an error found by
    tokenizing follows the datasets progress bar (`after_tokenizing`)."""
    code, out, err = result
    assert code == 2, (code, out, err)
    lines = [line for line in err.splitlines() if line.strip() and not INFO_LOG.match(line)]
    errors = [line for line in lines if line.startswith(ERROR)]
    assert len(errors) == 1, err
    assert lines[-1] == errors[0], err
    if not after_tokenizing:
        assert lines == errors, err
    else:
        assert all(line.lstrip("\r").startswith("Tokenizing") for line in lines[:-1]), err
    assert "Traceback" not in err and "Traceback" not in out, err
    message = errors[0]
    for needle in needles:
        assert needle in message, (needle, message)
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.iterdir()), sorted(runs.rglob("*"))
    return message


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# --- config ----------------------------------------------------------------------------------------------------

def test_malformed_yaml(cli, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model:\n  name_or_path: tiny-llama\n  task: [causal_lm\ntrain: {max_steps: 2}\n")
    assert_user_error(cli(*base(tmp_path, config=cfg)), tmp_path, str(cfg), "not valid YAML", "line", "fix the syntax")


def test_yaml_that_is_not_a_mapping(cli, tmp_path):
    cfg = tmp_path / "list.yaml"
    cfg.write_text("- model\n- data\n")
    assert_user_error(cli(*base(tmp_path, config=cfg)), tmp_path, "must hold a mapping of sections")


def test_unknown_key_suggests_the_closest(cli, tmp_path):
    assert_user_error(cli(*base(tmp_path, "--optim.learning_rate=1e-3")), tmp_path,
                      "unknown config key 'optim.learning_rate'", "did you mean 'lr'")


def test_unknown_key_in_yaml(cli, tmp_path):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text("train:\n  max_stepz: 3\n")
    assert_user_error(cli(*base(tmp_path, config=cfg)), tmp_path,
                      "unknown config key 'train.max_stepz'", "did you mean 'max_steps'")


def test_wrong_type(cli, tmp_path):
    assert_user_error(cli(*base(tmp_path, "--train.micro_batch_size=many")), tmp_path,
                      "'train.micro_batch_size'", "expects an integer", "'many'")


def test_wrong_choice(cli, tmp_path):
    assert_user_error(cli(*base(tmp_path, "--engine.kind=megatron")), tmp_path,
                      "engine.kind", "choose one of single, ddp, fsdp, deepspeed")


def test_missing_config_file(cli, tmp_path):
    missing = tmp_path / "nope.yaml"
    assert_user_error(cli(*base(tmp_path, config=missing)), tmp_path,
                      f"config file '{missing}' not found", "packaged recipe", "llama3-8b-lora-fsdp")


def test_conflicting_engine_options(cli, tmp_path):
    assert_user_error(cli(*base(tmp_path, "--engine.kind=fsdp", "--engine.offload_optimizer=true")), tmp_path,
                      "offload_optimizer", "engine.kind=deepspeed", "engine.cpu_offload")



def test_padding_free_rows_with_prompt_tuning(cli, tmp_path):
    assert_user_error(cli(*base(tmp_path, "--data.padding_free=true", "--peft.method=prompt_tuning")), tmp_path,
                      "peft.method=prompt_tuning", "cannot be kept apart", "data.padding_free=false")


# --- data --------------------------------------------------------------------------------------------------------

def test_missing_dataset_file(cli, tmp_path):
    missing = tmp_path / "missing.jsonl"
    assert_user_error(cli(*base(tmp_path, f"--data.path={missing}")), tmp_path,
                      f"data file '{missing}' not found", "set data.path to")


def test_malformed_jsonl_line_names_the_line(cli, tmp_path):
    path = tmp_path / "broken.jsonl"
    good = json.dumps(INSTRUCTIONS[0])
    path.write_text(f"{good}\n{good}\n\n{good}\n{{\"instruction\": \"x\", \"output\": }}\n{good}\n")
    assert_user_error(cli(*base(tmp_path, f"--data.path={path}")), tmp_path,
                      "line 5 is not valid JSON", "fix or remove that line")


def test_jsonl_line_that_is_not_an_object(cli, tmp_path):
    path = write_jsonl(tmp_path / "array.jsonl", [INSTRUCTIONS[0], [1, 2], INSTRUCTIONS[1]])
    assert_user_error(cli(*base(tmp_path, f"--data.path={path}")), tmp_path, "line 2", "not a JSON object")


def test_missing_required_field(cli, tmp_path):
    path = write_jsonl(tmp_path / "no_output.jsonl", [{"instruction": r["instruction"], "answer": "x"}
                                                      for r in INSTRUCTIONS])
    assert_user_error(cli(*base(tmp_path, f"--data.path={path}")), tmp_path,
                      "has no field 'output'", "set data.output_field")


def test_missing_value_in_required_field(cli, tmp_path):
    rows = [dict(r) for r in INSTRUCTIONS]
    rows[6]["output"] = None
    path = write_jsonl(tmp_path / "hole.jsonl", rows)
    assert_user_error(cli(*base(tmp_path, f"--data.path={path}")), tmp_path, "row 7", "'output'", "fill it in")


def test_empty_dataset_after_filtering(cli, tmp_path):
    """Every prompt is longer than data.max_length, so every row is dropped by the instruction encoder."""
    rows = [{**r, "instruction": "Please reverse all of the following words carefully " + r["instruction"]}
            for r in INSTRUCTIONS]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    assert_user_error(cli(*base(tmp_path, f"--data.path={path}", "--data.max_length=8")), tmp_path,
                      "no usable rows", "raise data.max_length", after_tokenizing=True)


def test_empty_dataset_file(cli, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    assert_user_error(cli(*base(tmp_path, f"--data.path={path}")), tmp_path, "has no rows")


def test_sequence_length_over_the_model_maximum(cli, tmp_path):
    """tiny-llama has max_position_embeddings=1024."""
    assert_user_error(cli(*base(tmp_path, "--data.max_length=2048")), tmp_path,
                      "data.max_length=2048", "max_position_embeddings=1024", "at most 1024")


def test_classification_more_classes_than_num_labels(cli, tmp_path):
    rows = [{"text": f"review {i}", "label": ["good", "bad", "meh"][i % 3]} for i in range(30)]
    path = write_jsonl(tmp_path / "three.jsonl", rows)
    assert_user_error(cli(*base(tmp_path, f"--data.path={path}", "--data.format=classification",
                                "--model.task=classification", "--model.num_labels=2")), tmp_path,
                      "3 classes", "model.num_labels=2", "set model.num_labels=3")


def test_classification_integer_label_out_of_range(cli, tmp_path):
    rows = [{"text": f"review {i}", "label": i % 2} for i in range(30)]
    rows[12]["label"] = 5
    path = write_jsonl(tmp_path / "ints.jsonl", rows)
    assert_user_error(cli(*base(tmp_path, f"--data.path={path}", "--data.format=classification",
                                "--model.task=classification", "--model.num_labels=2")), tmp_path,
                      "row 13", "label 5", "outside 0..1", "model.num_labels")


# --- model ---------------------------------------------------------------------------------------------------------

def test_model_path_missing(cli, tmp_path):
    missing = tmp_path / "no_such_model"
    assert_user_error(cli(*base(tmp_path, f"--model.name_or_path={missing}")), tmp_path,
                      f"model path '{missing}' not found", "tiny-llama")


def test_model_path_is_a_directory_but_not_a_model(cli, tmp_path):
    folder = tmp_path / "not_a_model"
    folder.mkdir()
    (folder / "notes.txt").write_text("weights are elsewhere\n")
    assert_user_error(cli(*base(tmp_path, f"--model.name_or_path={folder}")), tmp_path,
                      "has no config.json", "save_pretrained")


@pytest.fixture(scope="module")
def model_without_pad(tmp_path_factory) -> Path:
    """A tiny local HF Llama directory whose tokenizer defines no pad token."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from dist_tune.models import TOKENIZER_DIR

    out = tmp_path_factory.mktemp("nopad_model")
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    tok.save_pretrained(str(out))
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    tok_cfg.pop("pad_token", None)
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    assert AutoTokenizer.from_pretrained(str(out)).pad_token is None
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=None)
    LlamaForCausalLM(config).save_pretrained(str(out))
    return out


def test_tokenizer_without_pad_token_is_handled(cli, tmp_path, model_without_pad):
    code, out, err = cli(*base(tmp_path, f"--model.name_or_path={model_without_pad}", "--train.run_name=nopad"))
    assert code == 0, err[-3000:]
    assert ERROR not in err and "Traceback" not in err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0
    assert math.isfinite(summary["final_train_loss"]) and math.isfinite(summary["final_eval_loss"])
    run_dir = tmp_path / "runs" / "nopad"
    assert (run_dir / "final" / "config.json").is_file()


def test_local_model_max_position_embeddings_is_checked(cli, tmp_path, model_without_pad):
    """The limit comes from the model directory's own config.json (128 here), not a preset."""
    assert_user_error(cli(*base(tmp_path, f"--model.name_or_path={model_without_pad}", "--data.max_length=256")),
                      tmp_path, "max_position_embeddings=128", "at most 128")


# --- engines / batch -------------------------------------------------------------------------------------------

def _ds_cfg(tmp_path: Path, conf: dict, *, micro: int = 4, accum: int = 2) -> Config:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(conf))
    cfg = Config()
    cfg.engine.kind, cfg.engine.ds_config = "deepspeed", str(path)
    cfg.train.micro_batch_size, cfg.train.grad_accum = micro, accum
    return cfg


def test_deepspeed_train_batch_size_that_disagrees_with_the_world_size(tmp_path):
    """Global batch = micro × accum × world, so any world size works; an explicit DeepSpeed train_batch_size
    fixes the world size and must match it."""
    cfg = _ds_cfg(tmp_path, {"train_batch_size": 8, "zero_optimization": {"stage": 2}})
    with pytest.raises(UserError) as exc:
        ds_config(cfg, world_size=2, hidden_size=64)
    message = str(exc.value)
    assert "\n" not in message
    for needle in ("train_batch_size=8", "implies 16", "train.micro_batch_size 4", "train.grad_accum 2",
                   "world size 2", '"auto"'):
        assert needle in message, (needle, message)
    assert ds_config(cfg, world_size=1, hidden_size=64)["train_batch_size"] == 8  # 4 × 2 × 1 matches


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_deepspeed_auto_batch_works_on_any_world_size(tmp_path, world_size):
    cfg = _ds_cfg(tmp_path, {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                             "gradient_accumulation_steps": "auto", "zero_optimization": {"stage": 2}})
    conf = ds_config(cfg, world_size=world_size, hidden_size=64)
    assert conf["train_batch_size"] == 4 * 2 * world_size
    assert (conf["train_micro_batch_size_per_gpu"], conf["gradient_accumulation_steps"]) == (4, 2)


@pytest.mark.parametrize("key,value,needle", [("train_micro_batch_size_per_gpu", 2, "implies 4"),
                                              ("gradient_accumulation_steps", 1, "implies 2")])
def test_deepspeed_micro_batch_and_accumulation_must_agree(tmp_path, key, value, needle):
    with pytest.raises(UserError, match=needle):
        ds_config(_ds_cfg(tmp_path, {key: value}), world_size=2, hidden_size=64)


def test_deepspeed_batch_mismatch_through_the_cli(cli, tmp_path):
    """One process: micro 4 × accum 1 × world 1 = 4, but the JSON says 32; fails before data or model work."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 32, "zero_optimization": {"stage": 2}}))
    assert_user_error(cli(*base(tmp_path, "--engine.kind=deepspeed", f"--engine.ds_config={path}")), tmp_path,
                      "train_batch_size=32", "implies 4", "world size 1", '"auto"')
    assert not (tmp_path / "cache").exists()  # no dataset was tokenized


def test_deepspeed_config_file_missing(cli, tmp_path):
    missing = tmp_path / "nope.json"
    assert_user_error(cli(*base(tmp_path, "--engine.kind=deepspeed", f"--engine.ds_config={missing}")), tmp_path,
                      f"engine.ds_config '{missing}' not found")


def test_deepspeed_fail_fast_check_sees_the_resolved_precision(tmp_path, monkeypatch):
    """engine.mixed_precision=auto is settled for the device before the JSON is checked against it."""
    import torch

    from dist_tune.cluster import ClusterEnv
    from dist_tune.config import load_config
    from dist_tune.engines.deepspeed import DeepSpeedEngine

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}))
    overrides = {"engine.kind": "deepspeed", "engine.ds_config": str(path)}
    with pytest.raises(UserError, match=r"bf16.enabled=True but the dist_tune config implies False"):
        DeepSpeedEngine(load_config(None, overrides), ClusterEnv(), torch.device("cpu"))  # a CPU: fp32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cfg = load_config(None, overrides)
    DeepSpeedEngine(cfg, ClusterEnv(), torch.device("cuda", 0))
    assert cfg.engine.mixed_precision == "bf16"


def test_qlora_with_a_sharding_engine(cli, tmp_path):
    assert_user_error(cli(*base(tmp_path, "--peft.method=lora", "--peft.load_in_4bit=true", "--engine.kind=fsdp")),
                      tmp_path, "peft.load_in_4bit (QLoRA)", "engine.kind=fsdp", "use engine.kind=single or ddp")


# --- merge-adapter ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["prefix_tuning", "prompt_tuning", "adapter"])
def test_merge_adapter_of_a_method_that_cannot_be_merged(cli, tmp_path, method):
    from dist_tune.config import dump_config, load_config

    run_dir = tmp_path / method
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(dump_config(load_config(None, {"peft.method": method})))
    assert_user_error(cli("merge-adapter", str(run_dir)), tmp_path, f"peft.method={method}", "cannot be merged",
                      f"PeftModel.from_pretrained(base_model, '{run_dir / 'final'}')",
                      f"dist-tune generate {run_dir} PROMPT")
    assert not (run_dir / "merged").exists()


# --- resume ----------------------------------------------------------------------------------------------------------

def test_resume_from_a_run_dir_of_a_different_model(cli, tmp_path):
    common = base(tmp_path, "--train.run_name=same", "--checkpoint.save_steps=1", "--checkpoint.save_final=false")
    code, _, err = cli(*common)
    assert code == 0, err[-3000:]
    run_dir = tmp_path / "runs" / "same"
    assert (run_dir / "checkpoints" / "step_00000001" / "COMPLETE").is_file()
    assert (run_dir / "checkpoints" / "step_00000002" / "COMPLETE").is_file()  # the last step saves too
    before = tree_digest(run_dir)
    code, out, err = cli(*common, "--model.name_or_path=small-llama")
    assert code == 2, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip() and not INFO_LOG.match(line)]
    assert len(lines) == 1 and lines[0].startswith(ERROR) and err.endswith(lines[0] + "\n"), err  # no traceback
    for needle in ("step_00000002", "'tiny-llama'", "'small-llama'", "new train.run_name", "train.resume=none"):
        assert needle in lines[-1], (needle, lines[-1])
    assert tree_digest(run_dir) == before  # config.yaml, metrics and checkpoints untouched


def test_resume_from_an_incomplete_explicit_checkpoint(cli, tmp_path):
    partial = tmp_path / "elsewhere" / "step_00000004"
    partial.mkdir(parents=True)
    (partial / "trainer_state.json").write_text('{"step": 4}')
    assert_user_error(cli(*base(tmp_path, f"--train.resume={partial}")), tmp_path,
                      "not a complete checkpoint", "COMPLETE marker")


# --- secrets -----------------------------------------------------------------------------------------------------------

SECRET = "dt-secret-XYZ123"


def test_wandb_api_key_is_written_nowhere(tmp_path):
    """A real CLI process with WANDB_API_KEY set and an offline W&B run: the key is in no file of the run dir
    (config.yaml, metrics, logs, wandb/, checkpoints, final/) and not in the console output."""
    import base64

    from helpers import dist_tune

    proc = dist_tune("train", *TINY, "--log.wandb.mode=offline", "--train.max_steps=2", "--checkpoint.save_steps=1",
                     "--log.log_steps=1", f"--train.output_dir={tmp_path / 'runs'}", "--train.run_name=secret",
                     f"--data.cache_dir={tmp_path / 'cache'}", env={"WANDB_API_KEY": SECRET, "WANDB_SILENT": "false"})
    run_dir = tmp_path / "runs" / "secret"
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    wandb_files = [p for p in files if "wandb" in p.relative_to(run_dir).parts]
    assert any(p.suffix == ".wandb" for p in wandb_files), sorted(map(str, files))  # the offline run was written
    assert (run_dir / "checkpoints" / "step_00000001" / "COMPLETE").is_file() and (run_dir / "config.yaml").is_file()
    needles = [SECRET.encode(), base64.b64encode(SECRET.encode()), SECRET.encode("utf-16-le")]
    leaks = [str(p) for p in files for needle in needles if needle in p.read_bytes()]
    assert not leaks, leaks
    assert SECRET not in proc.stdout and SECRET not in proc.stderr
