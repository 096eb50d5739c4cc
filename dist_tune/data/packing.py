"""Packing of tokenized rows into longer rows with per-segment `position_ids`, streamed: the rows are read in
bounded chunks (the unfinished packed row carried across chunk boundaries) and written to an Arrow file that every
rank memory-maps, so no process holds the corpus."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets.arrow_writer import ArrowWriter

COLUMNS = ("input_ids", "labels", "position_ids")
CHUNK_TOKENS = 1 << 22  # tokens read per chunk: ~50 MB of working arrays, whatever the corpus size
FEATURES = datasets.Features({name: datasets.Sequence(datasets.Value("int32")) for name in COLUMNS})


def _flat(table: pa.Table, column: str) -> np.ndarray:
    return pc.list_flatten(table[column]).to_numpy().astype(np.int32, copy=False)


def _greedy_row_starts(lengths: np.ndarray, max_length: int, fill: int) -> np.ndarray:
    """Token offsets where rows start when whole examples fill rows in order (next fit, no splitting), the open
    row already holding `fill` tokens (max_length: no open row)."""
    starts, offset = [], 0
    for length in lengths.tolist():
        if fill + length > max_length:
            starts.append(offset)
            fill = 0
        fill += length
        offset += length
    return np.asarray(starts, dtype=np.int64)


def _positions(lengths: np.ndarray, row_starts: np.ndarray) -> np.ndarray:
    """Positions that restart at 0 at every example start and at every row start (the chunk starts an example)."""
    total = int(lengths.sum())
    example_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    segment_start = np.zeros(total, dtype=np.int64)
    segment_start[example_starts] = example_starts
    segment_start[row_starts] = row_starts
    return (np.arange(total, dtype=np.int64) - np.maximum.accumulate(segment_start)).astype(np.int32)


class Packer:
    """Packs chunks of tokenized rows, in order, into rows of at most max_length tokens.

    split_examples=True (text): fixed blocks of exactly max_length, the last one holds the remainder.
    split_examples=False (instruction): whole examples are packed greedily; none is split.
    `add` returns the rows a chunk completes; the open row waits for the next chunk, and `finish` returns it."""

    def __init__(self, max_length: int, *, split_examples: bool):
        self.max_length, self.split_examples = max_length, split_examples
        self.open = {name: np.zeros(0, dtype=np.int32) for name in COLUMNS}

    def add(self, chunk: pa.Table) -> pa.Table:
        lengths = pc.list_value_length(chunk["input_ids"]).to_numpy().astype(np.int64)
        if not len(lengths):
            return _rows({name: np.zeros(0, np.int32) for name in COLUMNS}, np.zeros(1, np.int64))
        carried = len(self.open["input_ids"])
        if self.split_examples:
            first = (self.max_length - carried) % self.max_length
            starts = np.arange(first, int(lengths.sum()), self.max_length)
        else:
            starts = _greedy_row_starts(lengths, self.max_length, carried if carried else self.max_length)
        stream = {"input_ids": _flat(chunk, "input_ids"), "labels": _flat(chunk, "labels"),
                  "position_ids": _positions(lengths, starts)}
        stream = {name: np.concatenate([self.open[name], stream[name]]) for name in COLUMNS}
        bounds = np.unique(np.concatenate([[0], starts + carried])) if carried else starts
        last = int(bounds[-1])
        self.open = {name: values[last:] for name, values in stream.items()}
        return _rows({name: values[:last] for name, values in stream.items()}, bounds)

    def finish(self) -> pa.Table:
        left = len(self.open["input_ids"])
        return _rows(self.open, np.asarray([0, left] if left else [0], dtype=np.int64))


def _rows(flat: dict[str, np.ndarray], bounds: np.ndarray) -> pa.Table:
    """Rows cut from flat arrays at `bounds` (row starts, then the end)."""
    ends = bounds if bounds[-1] == len(flat["input_ids"]) else np.append(bounds, len(flat["input_ids"]))
    offsets = pa.array(ends, pa.int32())
    return pa.table({name: pa.ListArray.from_arrays(offsets, pa.array(flat[name], pa.int32())) for name in COLUMNS})


def chunks(dataset: datasets.Dataset) -> Iterator[pa.Table]:
    """The dataset's input_ids and labels as Arrow tables of about CHUNK_TOKENS tokens."""
    tokens = int(pc.sum(pc.list_value_length(dataset.data.column("input_ids"))).as_py() or 0)
    rows = max(1, CHUNK_TOKENS * len(dataset) // max(tokens, 1))
    yield from dataset.select_columns(["input_ids", "labels"]).with_format("arrow").iter(batch_size=rows)


def pack(dataset: datasets.Dataset, max_length: int, *, split_examples: bool, path: Path) -> datasets.Dataset:
    """The packed rows of `dataset` (see Packer), written chunk by chunk to the Arrow file `path` (through a
    temporary file, so `path` is whole or absent) and memory-mapped from it."""
    packer = Packer(max_length, split_examples=split_examples)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    writer = ArrowWriter(features=FEATURES, path=str(tmp))
    try:
        for chunk in chunks(dataset):
            writer.write_table(packer.add(chunk))
        writer.write_table(packer.finish())
        writer.finalize()
    finally:
        writer.close()
    os.replace(tmp, path)
    return datasets.Dataset.from_file(str(path))
