"""Packing of tokenized rows into longer rows with per-segment `position_ids` (vectorized over Arrow/NumPy)."""
from __future__ import annotations

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def _flat(table: pa.Table, column: str) -> np.ndarray:
    return pc.list_flatten(table[column]).to_numpy().astype(np.int32, copy=False)


def _greedy_row_starts(lengths: np.ndarray, max_length: int) -> np.ndarray:
    """Token offsets where rows start when whole examples fill rows in order (next fit, no splitting)."""
    starts, fill, offset = [], max_length, 0
    for length in lengths.tolist():
        if fill + length > max_length:
            starts.append(offset)
            fill = 0
        fill += length
        offset += length
    return np.asarray(starts, dtype=np.int64)


def _rows(flat: np.ndarray, offsets: np.ndarray) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, pa.int32()))


def pack(dataset: datasets.Dataset, max_length: int, *, split_examples: bool) -> datasets.Dataset:
    """Concatenate rows (in order) and cut the stream into rows of at most `max_length` tokens.

    split_examples=True (text): fixed blocks of exactly max_length, the last one holds the remainder.
    split_examples=False (instruction): whole examples are packed greedily; none is split.
    `position_ids` restart at 0 at every example start and at every row start."""
    table = dataset.with_format("arrow")[:]
    lengths = pc.list_value_length(table["input_ids"]).to_numpy()
    total = int(lengths.sum())
    example_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    row_starts = (np.arange(0, total, max_length) if split_examples
                  else _greedy_row_starts(lengths, max_length))
    positions = np.arange(total, dtype=np.int64)
    segment_start = np.zeros(total, dtype=np.int64)
    segment_start[example_starts] = example_starts
    segment_start[row_starts] = row_starts
    segment_start = np.maximum.accumulate(segment_start)
    offsets = np.append(row_starts, total)
    return datasets.Dataset(pa.table({
        "input_ids": _rows(_flat(table, "input_ids"), offsets),
        "labels": _rows(_flat(table, "labels"), offsets),
        "position_ids": _rows((positions - segment_start).astype(np.int32), offsets),
    }))
