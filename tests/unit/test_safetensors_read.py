"""Positional reads of safetensors tensors and row blocks give the bytes safetensors itself reads."""
import pytest
import torch
from safetensors.torch import save_file

from dist_tune.safetensors_read import entries, read_rows, read_slice


@pytest.fixture
def checkpoint(tmp_path):
    tensors = {"w": torch.randn(10, 6, dtype=torch.bfloat16), "b": torch.arange(7, dtype=torch.float32),
               "s": torch.tensor(3, dtype=torch.int64)}
    save_file({k: tensors[k] for k in ("w", "s")}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": tensors["b"]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    return tmp_path, tensors


def test_whole_tensors_come_back_from_every_file(checkpoint):
    path, tensors = checkpoint
    found = entries(path)
    assert set(found) == set(tensors)
    for key, value in tensors.items():
        assert torch.equal(read_rows(found[key]), value)


def test_a_rows_block_is_read_into_the_target_itself(checkpoint):
    path, tensors = checkpoint
    target = torch.zeros(4, 6, dtype=torch.bfloat16)
    read_slice(entries(path)["w"], (3, 0), (4, 6), target)
    assert torch.equal(target, tensors["w"][3:7])


def test_a_column_block_in_another_dtype_is_cut_and_cast(checkpoint):
    path, tensors = checkpoint
    target = torch.zeros(2, 3, dtype=torch.float32)
    read_slice(entries(path)["w"], (5, 2), (2, 3), target)
    assert torch.equal(target, tensors["w"][5:7, 2:5].float())


def test_a_truncated_file_is_an_error(checkpoint):
    path, _ = checkpoint
    entry = entries(path)["b"]
    entry.path.write_bytes(entry.path.read_bytes()[:-8])
    with pytest.raises(OSError, match="ends before"):
        read_rows(entry)
