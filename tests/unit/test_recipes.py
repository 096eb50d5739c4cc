"""Packaged recipes (resolve, estimate offline, headers that match the estimate) and the config base: the demo only
with no arguments at all, the library defaults under any bare override, every changed value logged with its source."""
from __future__ import annotations

import logging
import re
import socket
import sys

import pytest
import yaml

from dist_tune import logs, run
from dist_tune.cli import RECIPES, main, recipe_names, resolve_recipe
from dist_tune.config import Config, changed_values, load_config, load_with_sources
from dist_tune.estimate import estimate

REAL_WORK = ["bert-sst2", "chat-sft", "gpt2-text", "llama3-70b-lora-multinode", "llama3-8b-full-zero3",
             "llama3-8b-lora-fsdp", "llama3-8b-qlora"]
MEMORY = re.compile(r"^# Expected memory per GPU: ([\d.]+) GiB \(dist-tune estimate-memory (\S+) --world_size (\d+)\)$",
                    re.M)
SIZED = re.compile(r"^# Sized for: (\d+) × (\d+) GB GPUs? \(world size (\d+)\)$", re.M)


@pytest.fixture(autouse=True)
def restore_logging():
    """main() installs the CLI's rank logging (record prefix, handler on the captured stderr): undo it."""
    factory, level = logging.getLogRecordFactory(), logging.getLogger().level
    yield
    logging.setLogRecordFactory(factory)
    logging.getLogger().setLevel(level)
    if logs._handler is not None:
        logs._handler.stream = sys.__stderr__


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 and no socket can connect: anything that tries to download fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_the_packaged_recipes():
    assert set(REAL_WORK) | {"demo"} == set(recipe_names())


@pytest.mark.parametrize("name", ["demo", *REAL_WORK])
def test_recipe_resolves_and_estimates_offline(name, offline, capsys):
    main(["show-config", name])
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown == load_config(RECIPES / f"{name}.yaml").to_dict()
    main(["estimate-memory", name, "--world_size", "8"])
    total = re.search(r"^total per GPU\s+([\d.]+) GiB$", capsys.readouterr().out, re.M)
    assert total and float(total.group(1)) > 0


@pytest.mark.parametrize("name", REAL_WORK)
def test_recipe_header_states_its_launch_gpus_and_estimated_memory(name, offline):
    text = resolve_recipe(name).read_text()
    header = text[:text.index("\nmodel:")]
    memory, sized = MEMORY.search(header), SIZED.search(header)
    assert memory and sized, header
    assert memory.group(2) == name and int(memory.group(3)) == int(sized.group(3)) == int(sized.group(1))
    launches = [line for line in header.splitlines() if re.match(r"#\s+(torchrun|sbatch|dist-tune train) ", line)]
    assert launches and all(f" {name}" in line for line in launches), header
    world = int(memory.group(3))
    assert any(f"--nproc-per-node={world}" in line or f"gpu:{world}" in line or "--nodes=" in line
               for line in launches), header
    e = estimate(load_config(resolve_recipe(name)), world)
    assert float(memory.group(1)) == pytest.approx(e.total_gib, abs=0.05)
    assert e.total_gib * 1024 ** 3 < int(sized.group(2)) * 1e9  # fits the GPUs it was sized for


def test_hub_ids_of_the_recipes_have_their_published_parameter_counts(offline):
    counts = {"gpt2-text": 124_439_808, "bert-sst2": 109_483_778, "llama3-8b-full-zero3": 8_030_261_248,
              "llama3-70b-lora-multinode": 70_553_706_496}
    for name, params in counts.items():
        cfg = load_config(resolve_recipe(name), {"peft.method": "full", "engine.replicate_degree": 1})
        assert estimate(cfg).params == params, name


def test_unknown_name_lists_the_recipes(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["show-config", "llama3-8b-lora"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("dist-tune: error: config file 'llama3-8b-lora' not found and not a packaged recipe (")
    assert "llama3-8b-lora-fsdp" in err and "gpt2-text" in err


def test_no_arguments_is_the_demo_any_override_starts_from_the_defaults(capsys):
    def shown(*args: str) -> dict:
        main(["show-config", *args])
        return yaml.safe_load(capsys.readouterr().out)

    demo = load_config(resolve_recipe("demo"))
    assert shown() == demo.to_dict()
    bare = shown("--data.path=bundled:text", "--data.format=text", "--train.epochs=1")
    defaults = Config().train
    assert (bare["train"]["max_steps"], bare["train"]["eval_max_batches"], bare["optim"]["lr"]) == \
        (defaults.max_steps, defaults.eval_max_batches, Config().optim.lr) == (None, None, 3e-4)
    extended = shown("demo", "--train.epochs=1")
    assert (extended["train"]["max_steps"], extended["optim"]["lr"]) == (demo.train.max_steps, 7e-4)


def test_changed_values_name_their_source(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("optim:\n  lr: 0.01\n  scheduler: cosine\ntrain:\n  max_steps: 9\n")
    cfg, sources = load_with_sources(path, {"train.max_steps": 5, "data.max_length": 256, "peft.method": "lora"})
    assert changed_values(cfg, sources) == [  # scheduler and max_length are set to their defaults: not listed
        "peft.method = lora (command line)", f"optim.lr = 0.01 ({path})", "train.max_steps = 5 (command line)"]
    demo, sources = load_with_sources(resolve_recipe("demo"), {}, "recipe demo")
    assert "optim.lr = 0.0007 (recipe demo)" in changed_values(demo, sources)
    assert not any(line.startswith(("optim.scheduler", "log.log_steps")) for line in changed_values(demo, sources))


def test_train_logs_every_changed_value_with_its_source(monkeypatch, capsys):
    trained = []
    monkeypatch.setattr(run, "train", lambda cfg: trained.append(cfg) or {"steps": 0})
    logs.rank_logging(0)
    logs._handler.stream = sys.stderr  # the captured stderr, as the real CLI's log lands on stderr
    main(["train", "demo", "--optim.lr=0.01", "--train.max_steps=3"])
    err = capsys.readouterr().err
    logged = re.findall(r"INFO dist_tune\.cli: \[rank 0\] config: (.*)", err)
    assert logged[0] == "13 values differ from the library defaults"
    assert {"optim.lr = 0.01 (command line)", "train.max_steps = 3 (command line)",
            "model.name_or_path = small-llama (recipe demo)", "optim.warmup_steps = 50 (recipe demo)"} <= set(logged)
    assert trained[0].optim.lr == 0.01


def test_readme_recipe_table_lists_every_recipe_with_its_header_memory():
    readme = (RECIPES.parents[1] / "README.md").read_text()
    table = dict(re.findall(r"^\| `([\w.-]+)` \|.*\| ([\d.]+ GiB|—) \|$", readme, re.M))
    assert set(table) == set(recipe_names())
    for name in REAL_WORK:
        assert table[name] == MEMORY.search(resolve_recipe(name).read_text()).group(1) + " GiB", name
