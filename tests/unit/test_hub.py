"""model.name_or_path as a Hugging Face Hub id: resolved through a real hub-cache layout on disk, no network."""
from __future__ import annotations

import httpx2
import pytest
import torch
from huggingface_hub import constants
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

from dist_tune import hub
from dist_tune.config import load_config
from dist_tune.data.chat import DEFAULT_CHAT_TEMPLATE
from dist_tune.errors import UserError
from dist_tune.models import PRESETS, load_model, load_tokenizer, model_config
from helpers import hub_snapshot

MAIN, V2 = "a" * 40, "b" * 40


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An offline hub cache holding acme/tiny: tiny-llama at main, and a 3-layer one at tag v2."""
    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    preset = load_config(None, {"model.name_or_path": "tiny-llama"})
    tokenizer = load_tokenizer(preset)
    for commit, ref, layers in ((MAIN, "main", 2), (V2, "v2", 3)):
        hf_cfg = model_config(preset, tokenizer)
        hf_cfg.num_hidden_layers = layers
        snapshot = hub_snapshot(cache, "acme/tiny", commit, ref)
        torch.manual_seed(layers)
        type(load_model(preset, tokenizer))(hf_cfg).save_pretrained(snapshot)
        tokenizer.save_pretrained(snapshot)
    return cache


def cfg_for(name: str, **overrides):
    return load_config(None, {"model.name_or_path": name, "model.dtype": "float32", **overrides})


def test_a_cached_hub_id_loads_its_snapshot_offline(cache):
    cfg = cfg_for("acme/tiny")
    model = load_model(cfg, load_tokenizer(cfg))
    saved = load_model(cfg_for(str(cache / "models--acme--tiny" / "snapshots" / MAIN)), load_tokenizer(cfg))
    assert model.config.num_hidden_layers == 2
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved.state_dict().values()))


@pytest.mark.parametrize("revision, layers", [("main", 2), ("v2", 3), (V2, 3), (MAIN, 2)])
def test_model_revision_picks_a_branch_tag_or_commit(cache, revision, layers):
    cfg = cfg_for("acme/tiny", **{"model.revision": revision})
    assert model_config(cfg, load_tokenizer(cfg)).num_hidden_layers == layers


def test_a_local_directory_wins_over_a_hub_id_of_the_same_name(cache, tmp_path, monkeypatch):
    local = tmp_path / "acme" / "tiny"
    cfg = cfg_for("tiny-llama")
    hf_cfg = model_config(cfg, load_tokenizer(cfg))
    hf_cfg.num_hidden_layers = 1
    hf_cfg.save_pretrained(local)
    load_tokenizer(cfg).save_pretrained(local)
    monkeypatch.chdir(tmp_path)
    cfg = cfg_for("acme/tiny")
    assert model_config(cfg, load_tokenizer(cfg)).num_hidden_layers == 1


def test_presets_never_touch_the_hub(cache):
    cfg = cfg_for("tiny-llama")
    assert model_config(cfg, load_tokenizer(cfg)).hidden_size == PRESETS["tiny-llama"]["hidden_size"]
    assert not (cache / "models--tiny-llama").exists()


@pytest.mark.parametrize("name, revision, expected", [
    ("acme/absent", "main", "model 'acme/absent' is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is "
                            "set; run `hf download acme/absent` where there is network, or set HF_HUB_OFFLINE=0"),
    ("acme/tiny", "v9", "model 'acme/tiny@v9' is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set; "
                        "run `hf download acme/tiny --revision v9` where there is network, or set HF_HUB_OFFLINE=0"),
])
def test_offline_and_not_cached_is_one_line_naming_the_id_and_the_fix(cache, name, revision, expected):
    cfg = cfg_for(name, **{"model.revision": revision})
    with pytest.raises(UserError) as err:
        load_tokenizer(cfg)
    assert str(err.value) == expected.format(cache=cache)


def test_weights_missing_from_a_cached_snapshot_are_a_miss_offline(cache):
    for weights in (cache / "models--acme--tiny" / "snapshots" / MAIN).glob("*.safetensors"):
        weights.unlink()
    cfg = cfg_for("acme/tiny")
    tokenizer = load_tokenizer(cfg)
    with pytest.raises(UserError, match=r"^model 'acme/tiny' is not in the Hugging Face cache"):
        load_model(cfg, tokenizer)


@pytest.mark.parametrize("name", ["./absent", "/no/such/model", "~/absent", "a/b/c"])
def test_paths_that_are_not_hub_ids_keep_the_not_found_error(cache, name):
    with pytest.raises(UserError) as err:
        load_tokenizer(cfg_for(name))
    assert str(err.value) == (f"model path '{name}' not found; set model.name_or_path to a local HF model directory, "
                              "a Hugging Face Hub id or a preset (tiny-llama, small-llama, llama-3.2-1b, llama-3-8b)")


def online(monkeypatch, download):
    """Online mode with the network part of snapshot_download replaced by `download`."""
    real = hub.snapshot_download
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "snapshot_download",
                        lambda *a, local_files_only=False, **kw: real(*a, local_files_only=True, **kw)
                        if local_files_only else download(*a, **kw))


def test_online_a_miss_downloads_and_a_hit_does_not(cache, monkeypatch):
    calls = []

    def download(repo_id, *, revision, allow_patterns, cache_dir, **_):
        calls.append((repo_id, revision, "*.safetensors" in allow_patterns))
        snapshot = hub_snapshot(cache, repo_id, "c" * 40)
        load_model(cfg_for("tiny-llama"), load_tokenizer(cfg_for("tiny-llama"))).save_pretrained(snapshot)
        load_tokenizer(cfg_for("tiny-llama")).save_pretrained(snapshot)
        return str(snapshot)

    online(monkeypatch, download)
    cfg = cfg_for("acme/fresh")
    assert load_model(cfg, load_tokenizer(cfg)).config.hidden_size == PRESETS["tiny-llama"]["hidden_size"]
    assert calls == [("acme/fresh", "main", False)]
    cfg = cfg_for("acme/tiny")
    load_model(cfg, load_tokenizer(cfg))
    assert len(calls) == 1


def test_a_hub_model_without_safetensors_is_one_line(cache, monkeypatch):
    def download(repo_id, **_):
        snapshot = hub_snapshot(cache, repo_id, "d" * 40)
        load_tokenizer(cfg_for("tiny-llama")).save_pretrained(snapshot)
        model_config(cfg_for("tiny-llama"), load_tokenizer(cfg_for("tiny-llama"))).save_pretrained(snapshot)
        return str(snapshot)

    online(monkeypatch, download)
    cfg = cfg_for("acme/old")
    tokenizer = load_tokenizer(cfg)
    with pytest.raises(UserError) as err:
        load_model(cfg, tokenizer)
    assert str(err.value) == ("model 'acme/old' has no .safetensors weights on the Hugging Face Hub; set "
                              "model.revision to one that has them, or save the model with save_pretrained and "
                              "point model.name_or_path at that directory")


@pytest.mark.parametrize("error, expected", [
    (RepositoryNotFoundError("404", response=httpx2.Response(404, request=httpx2.Request("GET", "https://hf.co"))),
     "model 'acme/typo' is not on the Hugging Face Hub (or is private: set HF_TOKEN); check the spelling of "
     "model.name_or_path, or point it at a local directory or a preset"),
    (LocalEntryNotFoundError("connection refused"),
     "cannot reach the Hugging Face Hub for model 'acme/typo' and it is not cached; check the network, or run "
     "`hf download acme/typo` where there is one"),
])
def test_online_failures_are_one_line(cache, monkeypatch, error, expected):
    def download(*_, **__):
        raise error

    online(monkeypatch, download)
    with pytest.raises(UserError) as err:
        load_tokenizer(cfg_for("acme/typo"))
    assert str(err.value) == expected


def test_chat_runs_load_a_tokenizer_that_saves_the_chat_template(cache, tmp_path):
    for data_format, template in (("chat", DEFAULT_CHAT_TEMPLATE), ("instruction", None)):
        load_tokenizer(cfg_for("acme/tiny", **{"data.format": data_format})).save_pretrained(tmp_path / data_format)
        saved = tmp_path / data_format / "chat_template.jinja"
        assert (saved.read_text() if saved.exists() else None) == template


def test_a_mixture_with_a_chat_source_saves_the_chat_template(cache, tmp_path):
    sources = '[{path: "bundled:instructions", weight: 3}, {path: "bundled:chat", format: chat}]'
    load_tokenizer(cfg_for("acme/tiny", **{"data.sources": sources})).save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text() == DEFAULT_CHAT_TEMPLATE
