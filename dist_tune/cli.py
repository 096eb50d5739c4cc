"""`dist-tune` command line (fire): train, prepare, eval, generate, export, merge-adapter, estimate-memory,
show-config, report."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import fire

from dist_tune.config import Config, changed_values, dump_config, load_with_sources
from dist_tune.errors import UserError
from dist_tune.cluster import detect
from dist_tune.logs import rank_logging

log = logging.getLogger(__name__)

RECIPES = Path(__file__).parent / "recipes"
DEMO = "demo"


def recipe_names() -> list[str]:
    return sorted(path.stem for path in RECIPES.glob("*.yaml"))


def resolve_recipe(config: str) -> Path:
    """A YAML path, or the name of a packaged recipe (`recipe_names`)."""
    packaged = RECIPES / f"{config}.yaml"
    if not Path(config).exists() and packaged.is_file():
        return packaged
    if not Path(config).is_file():
        raise UserError(f"config file '{config}' not found and not a packaged recipe ({', '.join(recipe_names())}); "
                        "pass an existing YAML file or a recipe name")
    return Path(config)


def _load(config: str | None, overrides: dict) -> tuple[Config, dict[str, str]]:
    """The config and the source of each key set. No config and no overrides is the demo; with overrides alone
    the base is the library defaults."""
    if config is None and not overrides:
        config = DEMO
    if config is None:
        return load_with_sources(None, overrides)
    path = resolve_recipe(str(config))
    return load_with_sources(path, overrides, f"recipe {config}" if path.parent == RECIPES else str(path))


def _config(config: str | None, overrides: dict) -> Config:
    return _load(config, overrides)[0]


def _flag(value) -> bool:
    return value is True or str(value).lower() in ("true", "1", "yes")


def _answers(cfg: Config, run_dir: Path) -> str:
    """The last eval's generation exact match and first answers (eval.generate_samples), prompts without the
    tokenizer's special tokens."""
    from dist_tune.generation import GENERATIONS_FILE, format_answers
    from dist_tune.models import load_tokenizer

    rows = [json.loads(line) for line in (run_dir / GENERATIONS_FILE).read_text().splitlines()]
    return format_answers(rows, load_tokenizer(cfg).all_special_tokens)


def train(config: str | None = None, *, dry_run: bool = False, **overrides) -> None:
    """Train. CONFIG is a YAML file or packaged recipe (with no arguments at all: the demo); overrides like
    --optim.lr=1e-4. --dry_run prints the plan (world size, batch, steps, memory, run dir, W&B) and exits."""
    cfg, sources = _load(config, overrides)
    changes = changed_values(cfg, sources)
    if _flag(dry_run):
        from dist_tune.plan import format_plan, layout, plan

        if detect(resolve=False).rank == 0:  # under torchrun/srun the other ranks have nothing to add
            print(format_plan(plan(cfg, changes, layout())))
        return
    from dist_tune.run import train as run_train

    log.info("config: %s", f"{len(changes)} values differ from the library defaults" if changes
             else "the library defaults")
    for line in changes:
        log.info("config: %s", line)
    summary = run_train(cfg)
    if os.environ.get("RANK", "0") == "0":
        if "final_eval_exact_match" in summary:
            print(_answers(cfg, Path(summary["run_dir"])))
        print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}, default=str))


def prepare(config: str | None = None, **overrides) -> None:
    """Tokenize (and pack) the data of CONFIG into data.cache_dir, with no model weights and no GPU: a CPU job
    before the training job, which then memory-maps the result. Prints rows, tokens, dropped rows, padding, the
    length distribution and the cache files; the last line is the same as JSON."""
    from dist_tune.prepare import format_report, prepare_data

    report = prepare_data(_config(config, overrides))
    print(format_report(report))
    print(json.dumps(report))


def show_config(config: str | None = None, **overrides) -> None:
    """Print the resolved config (defaults + YAML + overrides) as YAML."""
    print(dump_config(_config(config, overrides)), end="")


def eval(run_dir: str, generate: bool = False, **overrides) -> None:  # noqa: A001 - the command is called eval
    """Evaluate a finished run's final model on its validation data (overrides like --data.validation_path=...);
    --generate adds generation metrics over eval.generate_samples prompts (16 when the run set none; e.g.
    --eval.generate_samples=32)."""
    from dist_tune.evaluate import evaluate_run

    print(json.dumps(evaluate_run(Path(run_dir), overrides, generate=_flag(generate))))


def generate(run_dir: str, prompt: str, input: str = "", max_new_tokens: int = 64,  # noqa: A002
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> None:
    """Generate from a trained causal LM; instruction runs wrap PROMPT in their training template."""
    from dist_tune.evaluate import generate_text

    print(generate_text(Path(run_dir), prompt, input, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_p=top_p, seed=seed))


def export(run_dir: str, out: str | None = None, checkpoint: str | None = None, verify: bool = True) -> None:
    """Consolidate the latest (or given) checkpoint of any engine into one HF save_pretrained directory.
    --verify=false skips the check of its files against the digests recorded at save (never the pickle check)."""
    from dist_tune.export import export_checkpoint

    print(export_checkpoint(Path(run_dir), out and Path(out), checkpoint and Path(checkpoint), verify=_flag(verify)))


def merge_adapter(run_dir: str, out: str | None = None) -> None:
    """Merge a run's peft adapter into its base model and save a plain transformers model."""
    from dist_tune.export import merge_adapter as merge

    print(merge(Path(run_dir), out and Path(out)))


def estimate_memory(config: str | None = None, world_size: int = 1, procs_per_node: int | None = None,
                    **overrides) -> None:
    """Per-GPU model-state and activation memory estimate for a config at a world size, and host RAM per node
    (procs_per_node processes; default all on one node, up to 8) to load and to save the model."""
    from dist_tune.estimate import estimate, format_estimate

    print(format_estimate(estimate(_config(config, overrides), world_size, procs_per_node)))


def report(run_dir: str) -> None:
    """Summary table of a finished or interrupted run."""
    from dist_tune.report import report as run_report

    print(run_report(Path(run_dir)))


COMMANDS = {"train": train, "prepare": prepare, "eval": eval, "generate": generate, "export": export, "merge-adapter": merge_adapter,
            "estimate-memory": estimate_memory, "show-config": show_config, "report": report}


def main(argv: list[str] | None = None) -> None:
    rank_logging(detect(resolve=False).rank)
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["--help"]
    try:
        fire.Fire(COMMANDS, command=argv, name="dist-tune")
    except UserError as exc:
        print(f"dist-tune: error: {exc}", file=sys.stderr)
        record_for_launcher(exc)
        sys.exit(2)


def record_for_launcher(exc: UserError) -> None:
    """Under torchrun, the error line also goes to the worker's error file (the format torch.distributed.elastic
    writes), so the launcher's failure summary ends the job's output naming it rather than `error_file: <N/A>`."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        line = f"dist-tune: error: {exc}"
        Path(path).write_text(json.dumps({"message": {"message": line, "extraInfo": {
            "py_callstack": line, "timestamp": str(int(time.time()))}}}))


if __name__ == "__main__":
    main()
