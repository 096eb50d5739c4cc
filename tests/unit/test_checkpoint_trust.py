"""A checkpoint is data: pickles that could run code are refused before anything unpickles them (our RNG files,
DeepSpeed's states, DCP's metadata and byte items), files are checked against the digests recorded at save, and
our own RNG state round-trips through weights-only loading."""
from __future__ import annotations

import io
import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import RunsCode
from dist_tune import checkpoint as ckpt
from dist_tune import checkpoint_trust as trust


def test_rng_state_round_trips_through_weights_only_loading(tmp_path):
    np.random.seed(1), random.seed(2), torch.manual_seed(3)
    np.random.normal()  # a cached Gaussian is part of NumPy's state
    torch.save(ckpt.rng_state(), tmp_path / "rng.pt")
    assert trust.torch_file_globals(tmp_path / "rng.pt") == set()  # tensors and plain numbers only
    expected = (np.random.rand(3).tolist(), np.random.normal(), random.random(), torch.rand(2).tolist())
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (np.random.rand(3).tolist(), np.random.normal(), random.random(), torch.rand(2).tolist()) == expected


def test_an_rng_file_of_the_old_format_still_loads(tmp_path):
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    torch.save(state, tmp_path / "rng_rank0.pt")
    trust.check_pickles(tmp_path)  # NumPy's array globals are allowed for these files
    expected = np.random.rand(2).tolist()
    ckpt.set_rng_state(ckpt.read_rng_state(tmp_path / "rng_rank0.pt"))
    assert np.random.rand(2).tolist() == expected


@pytest.mark.parametrize("name", ["rng_rank0.pt", "engine_state.pt",
                                  "deepspeed/state/zero_pp_rank_0_mp_rank_00_model_states.pt"])
def test_a_torch_file_that_runs_code_is_refused_unread(tmp_path, name):
    marker = tmp_path / "ran"
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"torch": torch.get_rng_state(), "payload": RunsCode(marker)}, tmp_path / name)
    with pytest.raises(trust.UnsafeCheckpoint, match=rf"checkpoint file .*{name} holds the global 'posix.system'"):
        trust.check_pickles(tmp_path)
    assert not marker.exists()


def test_deepspeeds_own_globals_pass(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    torch.save({"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.weights, "w": torch.ones(2)},
               tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    trust.check_pickles(tmp_path)


def test_a_legacy_pickle_named_pt_is_refused(tmp_path):
    (tmp_path / "rng_rank0.pt").write_bytes(pickle.dumps({"torch": [1, 2]}))
    with pytest.raises(trust.UnsafeCheckpoint, match="is not a torch.save zip archive"):
        trust.check_pickles(tmp_path)


def dcp_checkpoint(path: Path) -> Path:
    import torch.distributed.checkpoint as dcp

    dcp.save({"w": torch.ones(3), "lr": 0.1, "betas": (0.9, 0.99)}, storage_writer=dcp.FileSystemWriter(str(path)),
             no_dist=True)
    return path


def test_dcp_metadata_that_runs_code_is_refused_unread(tmp_path):
    directory = dcp_checkpoint(tmp_path / "dcp")
    trust.check_pickles(tmp_path)  # the honest metadata and byte items pass
    marker = tmp_path / "ran"
    (directory / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(trust.UnsafeCheckpoint, match=r"dcp/\.metadata holds the global 'posix.system'"):
        trust.check_pickles(tmp_path)
    assert not marker.exists()


def test_a_dcp_byte_item_that_runs_code_is_refused_unread(tmp_path):
    directory = dcp_checkpoint(tmp_path / "dcp")
    metadata = trust.dcp_metadata(directory / ".metadata")
    (where, _), *_ = trust.dcp_byte_items(directory, metadata)
    buffer = io.BytesIO()
    torch.save(RunsCode(tmp_path / "ran"), buffer)
    evil = buffer.getvalue()
    index = next(i for i in metadata.storage_data if f"'{i.fqn}'" in where)
    info = metadata.storage_data[index]
    data = bytearray((directory / info.relative_path).read_bytes())
    data[info.offset:info.offset + info.length] = evil
    (directory / info.relative_path).write_bytes(bytes(data))
    metadata.storage_data[index] = type(info)(info.relative_path, info.offset, len(evil))
    (directory / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(trust.UnsafeCheckpoint, match=r"\(item '.*'\) holds the global 'posix.system'"):
        trust.check_pickles(tmp_path)
    assert not (tmp_path / "ran").exists()


def recorded(tmp_path: Path) -> tuple[Path, dict]:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"x" * 1000)
    (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 10)
    for rank in range(2):
        trust.write_share(tmp_path, rank, 2, exclude=())
    record = trust.merge_shares(tmp_path)
    (tmp_path / "COMPLETE").write_text(json.dumps({"files": record}))
    return tmp_path, record


def test_digests_are_merged_from_every_ranks_share(tmp_path):
    path, record = recorded(tmp_path)
    assert sorted(record) == ["a.bin", "sub/b.bin"] and record["a.bin"][0] == 1000
    assert not list(path.glob(".digests-rank*"))
    assert trust.read_record(path / "COMPLETE") == record
    (path / "OLD").write_text("ok\n")  # the marker of checkpoints written before records
    assert trust.read_record(path / "OLD") is None
    assert trust.verify_share(path, record) is None


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / "a.bin").write_bytes(b"x" * 999 + b"z"), r"a.bin changed since it was written"),
    (lambda p: (p / "a.bin").write_bytes(b"x" * 10), r"a.bin has 10 bytes where 1000 were written"),
    (lambda p: (p / "sub" / "b.bin").unlink(), r"b.bin is missing")])
def test_a_changed_truncated_or_missing_file_is_found(tmp_path, damage, message):
    path, record = recorded(tmp_path)
    damage(path)
    found = trust.verify_share(path, record)
    assert found is not None
    with pytest.raises(Exception, match=message + r".*set checkpoint.verify=false"):
        raise trust.integrity_error(path, found)


def test_each_rank_hashes_only_its_share_but_checks_every_size(tmp_path):
    path, record = recorded(tmp_path)
    (path / "sub" / "b.bin").write_bytes(b"z" * 10)  # same size, other bytes: only its hasher sees it
    findings = [trust.verify_share(path, record, rank, 2) for rank in range(2)]
    assert sum(f is not None for f in findings) == 1


def custom_code_model(path: Path) -> Path:
    """A model directory whose config needs the Python file beside it; importing that file leaves a marker."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "model_type": "my-custom", "auto_map": {"AutoConfig": "configuration_my.MyConfig"}, "hidden_size": 8}))
    (path / "configuration_my.py").write_text(
        "from pathlib import Path\nfrom transformers import PretrainedConfig\n"
        f"Path({str(path / 'ran')!r}).touch()\n"
        "class MyConfig(PretrainedConfig):\n    model_type = 'my-custom'\n")
    return path


def test_remote_code_runs_only_when_the_user_turns_it_on(tmp_path, caplog):
    from types import SimpleNamespace

    from dist_tune.config import load_config
    from dist_tune.errors import UserError
    from dist_tune.models import model_config

    path = custom_code_model(tmp_path / "custom")
    cfg = load_config(None, {"model.name_or_path": str(path)})
    assert cfg.model.trust_remote_code is False
    with pytest.raises(UserError, match=r"model '.*custom' needs its own Python code to load .* set "
                                        r"model.trust_remote_code=true to run it$"):
        model_config(cfg, SimpleNamespace(pad_token_id=0))
    assert not (path / "ran").exists()
    cfg.model.trust_remote_code = True
    with caplog.at_level("WARNING"):
        assert type(model_config(cfg, SimpleNamespace(pad_token_id=0))).__name__ == "MyConfig"
    assert (path / "ran").exists()
    assert [r.message for r in caplog.records if "trust_remote_code" in r.message] == [
        f"model.trust_remote_code=true: the Python files that come with '{path}' run in this process"]
