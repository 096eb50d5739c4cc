"""Reading HF safetensors tensors, or a rank's rows of them, with positional reads straight into their destination.

safetensors' own reader memory-maps the file: every page a rank touches counts in its RSS until the file is
closed, so reading half of each tensor of a 2 GiB file through one map shows up as a second copy of the rank's
shard. Positional reads leave only what the rank keeps."""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.futures import Future

DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
          "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
          "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@dataclass(frozen=True)
class Entry:
    """Where one tensor's bytes are: its file, dtype, shape and the absolute byte offset of its data."""
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize


def file_entries(path: Path) -> dict[str, Entry]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return {key: Entry(path, DTYPES[meta["dtype"]], tuple(meta["shape"]), 8 + size + meta["data_offsets"][0])
            for key, meta in header.items()}


def entries(source: Path) -> dict[str, Entry]:
    """Every tensor of every .safetensors file in the directory `source` (as DCP's HF reader lists them)."""
    found: dict[str, Entry] = {}
    for path in sorted(source.glob("*.safetensors")):
        found.update(file_entries(path))
    return found


def read_rows(entry: Entry, start: int = 0, count: int | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [start, start + count) of the tensor (all of it by default), read into `out` when given (contiguous,
    of the entry's dtype) or into a new tensor."""
    if entry.shape:
        count = entry.shape[0] - start if count is None else count
        shape = (count, *entry.shape[1:])
    else:
        shape = ()
    out = torch.empty(shape, dtype=entry.dtype) if out is None else out
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    position, done = entry.offset + start * entry.row_bytes, 0
    with open(entry.path, "rb", buffering=0) as f:
        while done < len(view):
            got = os.preadv(f.fileno(), [view[done:]], position + done)
            if got == 0:
                raise OSError(f"{entry.path} ends before its tensor data does")
            done += got
    return out


def read_slice(entry: Entry, offsets: tuple[int, ...], lengths: tuple[int, ...], target: torch.Tensor) -> None:
    """Copy the block at `offsets` of size `lengths` into `target`: rows are read straight into it when the
    block spans the other dimensions whole and `target` is a contiguous tensor of the file's dtype."""
    if not entry.shape:
        target.copy_(read_rows(entry))
        return
    rest_whole = tuple(lengths[1:]) == entry.shape[1:]
    if rest_whole and target.is_contiguous() and target.dtype == entry.dtype:
        read_rows(entry, offsets[0], lengths[0], out=target)
        return
    rows = read_rows(entry, offsets[0], lengths[0])
    target.copy_(rows[(slice(None), *(slice(o, o + n) for o, n in zip(offsets[1:], lengths[1:])))])


class PositionalHFReader(HuggingFaceStorageReader):
    """DCP's HF safetensors reader, reading each requested block with positional reads instead of a memory map."""

    def read_data(self, plan, planner) -> Future[None]:
        found = entries(Path(self.path))
        for item in plan.items:
            target = planner.resolve_tensor(item).detach()
            read_slice(found[item.storage_index.fqn], tuple(item.storage_offsets), tuple(item.lengths), target)
            planner.commit_tensor(item, target)
        done: Future[None] = Future()
        done.set_result(None)
        return done
