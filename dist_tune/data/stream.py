"""data.streaming: training rows read, tokenized and (data.pack) packed on the fly from `hf:` datasets or local shard
directories too large to prepare, each rank reading its own share. A rank's place in the stream (the reader's
position, the packer's open row, rows made but not yet trained on) is plain data a checkpoint keeps, so a resumed
run continues on exactly the next row."""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections import deque
from collections.abc import Callable, Iterator

import datasets
import numpy as np
import pyarrow as pa
import torch
from datasets.distributed import split_dataset_by_node

from dist_tune.config import Config
from dist_tune.data import chat
from dist_tune.data.formats import ENCODERS, field_keys, output_features
from dist_tune.data.mixture import source_config
from dist_tune.data.packing import COLUMNS, Packer
from dist_tune.data.sources import BUILDER_OPTIONS, BUILDERS, HUB, _hub_snapshot, _shards, resolve_path
from dist_tune.errors import DataError

log = logging.getLogger(__name__)

ENCODE_BATCH = 64  # records tokenized (and packed) together


def _local_stream(path: str, key: str) -> datasets.IterableDataset:
    """A local file or shard directory read record by record by the datasets library's builder for its type."""
    resolved = resolve_path(path, key)
    shards = _shards(resolved) if resolved.is_dir() else [resolved]
    kinds = {p.suffix.lower() for p in shards}
    if not shards or len(kinds) > 1 or not kinds <= set(BUILDERS):
        raise DataError(f"data.streaming reads one kind of .jsonl/.json/.parquet/.csv shard; '{path}' holds "
                        f"{', '.join(sorted(kinds)) or 'none'}; set {key} to a file or a directory of one kind")
    suffix = kinds.pop()
    return datasets.load_dataset(BUILDERS[suffix], data_files=[str(p) for p in shards], split="train",
                                 streaming=True, **BUILDER_OPTIONS.get(suffix, {}))


def open_stream(cfg: Config, key: str) -> datasets.IterableDataset:
    """The records of cfg.data.path as a stream: an `hf:` dataset (its local snapshot when there is one) or a
    local file or shard directory."""
    data = cfg.data
    if not data.path.startswith(HUB):
        return _local_stream(data.path, key)
    name = data.path[len(HUB):]
    try:
        return datasets.load_dataset(_hub_snapshot(name) or name, data.config, split=data.split, streaming=True,
                                     data_files=data.data_files)
    except (ConnectionError, FileNotFoundError, ValueError) as exc:
        raise DataError(f"dataset '{name}' cannot be streamed: {next(iter(str(exc).splitlines()), '')}; check "
                        f"{key}, data.config and data.split") from None


def rank_share(stream: datasets.IterableDataset, rank: int, world_size: int, source: str) -> datasets.IterableDataset:
    """This rank's share: whole shards when their count divides among the ranks, else one record in world_size of
    all of them (each rank then reads every shard, and tokenizes only its own records); one INFO line says which."""
    if world_size == 1:
        return stream
    shards = stream.num_shards
    if shards % world_size == 0:
        log.info("streaming '%s': whole shards per rank (%d of %d each)", source, shards // world_size, shards)
        return split_dataset_by_node(stream, rank=rank, world_size=world_size)
    log.info("streaming '%s': interleaved: %d shard(s) do not divide among %d ranks, so every rank reads them all "
             "and keeps one record in %d", source, shards, world_size, world_size)
    return stream.filter(lambda _, index: index % world_size == rank, with_indices=True)


def _check_record(batch: dict, cfg: Config, source: str) -> None:
    """The fields the format needs are there and hold text (a stream is checked as it is read)."""
    for field, key in field_keys(cfg).items():
        if field not in batch:
            raise DataError(f"streamed records of '{source}' have no field '{field}' (fields: {', '.join(batch)}); "
                            f"set {key} to the field that holds it")
        if key != "data.label_field" and not all(isinstance(v, str) for v in batch[field]):
            raise DataError(f"a streamed record of '{source}' has no text in '{field}'; fill it in or drop the "
                            "record")


def encode_records(batch: dict, indices: list[int], *, cfg: Config, tokenizer, source: str) -> dict:
    """input_ids and labels of a batch of streamed records, as the prepared path encodes them."""
    _check_record(batch, cfg, source)
    encode = functools.partial(ENCODERS[cfg.data.format], tokenizer=tokenizer, cfg=cfg)
    if cfg.data.format != "chat":
        return encode(batch)
    where = f"{source} (streamed; rows counted in this rank's share)"
    rows = [i + 1 for i in indices]
    column = batch[chat.messages_field(cfg, list(batch), source)]
    turns = [chat.conversation(value, row, where) for value, row in zip(column, rows)]
    return encode({chat.MESSAGES: turns, chat.ROW: rows}, source=where)


def _encoded(cfg: Config, key: str, rank: int, world_size: int, tokenizer) -> datasets.IterableDataset:
    stream = rank_share(open_stream(cfg, key), rank, world_size, cfg.data.path)
    encode = functools.partial(encode_records, cfg=cfg, tokenizer=tokenizer, source=cfg.data.path)
    return stream.map(encode, batched=True, batch_size=ENCODE_BATCH, with_indices=True,
                      remove_columns=stream.column_names, features=output_features(cfg, None))


def train_stream(cfg: Config, tokenizer, rank: int, world_size: int) -> datasets.IterableDataset:
    """This rank's encoded training records: of data.path, or of data.sources drawn by weight (seeded by
    train.seed, the same draw on every rank, each from its own share)."""
    if not cfg.data.sources:
        return _encoded(cfg, "data.path", rank, world_size, tokenizer)
    parts = [_encoded(source_config(cfg, s), f"data.sources[{i}].path", rank, world_size, tokenizer)
             for i, s in enumerate(cfg.data.sources)]
    weights = np.asarray([s.weight for s in cfg.data.sources], dtype=np.float64)
    for i, (s, w) in enumerate(zip(cfg.data.sources, weights / weights.sum())):
        log.info("streaming data.sources[%d] %s: %.1f%% of the records drawn", i, s.path, 100 * w)
    return datasets.interleave_datasets(parts, probabilities=(weights / weights.sum()).tolist(), seed=cfg.train.seed,
                                        stopping_strategy="all_exhausted")


def _flat_rows(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Rows as flat int tensors per column plus their offsets (weights-only loadable)."""
    lengths = torch.tensor([len(row["input_ids"]) for row in rows], dtype=torch.int64)
    columns = [name for name in COLUMNS if rows and name in rows[0]]
    flat = {name: torch.tensor([x for row in rows for x in row[name]], dtype=torch.int32) for name in columns}
    return {"lengths": lengths, **flat}


def _unflat_rows(saved: dict[str, torch.Tensor]) -> list[dict]:
    ends = torch.cumsum(saved["lengths"], 0).tolist()
    starts = [0, *ends[:-1]]
    columns = [name for name in COLUMNS if name in saved]
    return [{name: saved[name][s:e].tolist() for name in columns} for s, e in zip(starts, ends)]


@dataclasses.dataclass
class StreamBatches:
    """This rank's training micro-batches from a stream, read as they are needed; a stream that ends starts its
    next epoch. `state_dict` is the rank's place in it (see module doc)."""

    stream: datasets.IterableDataset
    collate: Callable[[list[dict]], dict]
    micro_batch_size: int
    packer: Packer | None
    epoch: int = 0

    def __post_init__(self) -> None:
        self.pending: deque[dict] = deque()
        self._read_state = self.stream.state_dict()
        self._records: Iterator[dict] | None = None
        self._epoch_records = 0

    def _next_record(self) -> dict | None:
        if self._records is None:
            self.stream.set_epoch(self.epoch)
            self._records = iter(self.stream)
        record = next(self._records, None)
        if record is not None:
            self._epoch_records += 1
            return record
        if self._epoch_records == 0:
            raise DataError("this rank's share of the streamed data is empty (fewer usable records than ranks?); "
                            "add data or run on fewer ranks")
        log.info("streamed data: epoch %d ended; starting epoch %d", self.epoch, self.epoch + 1)
        self.epoch, self._epoch_records, self._records = self.epoch + 1, 0, None
        return None

    def _refill(self) -> None:
        records = []
        while len(records) < ENCODE_BATCH:
            record = self._next_record()
            if record is None:
                break
            records.append(record)
        self._read_state = self.stream.state_dict()
        if self.packer is None:
            self.pending.extend(records)
            return
        table = pa.table({name: [r[name] for r in records] for name in ("input_ids", "labels")},
                         schema=pa.schema([(name, pa.list_(pa.int32())) for name in ("input_ids", "labels")]))
        self.pending.extend(self.packer.add(table).to_pylist())

    def next_batch(self) -> dict:
        while len(self.pending) < self.micro_batch_size:
            self._refill()
        return self.collate([self.pending.popleft() for _ in range(self.micro_batch_size)])

    def take(self, state, count: int) -> list[dict]:
        """`count` micro-batches; the TrainState's epoch follows the stream's."""
        batches = [self.next_batch() for _ in range(count)]
        state.epoch = self.epoch
        return batches

    def epoch_progress(self, state) -> float:
        return float(self.epoch)

    def state_dict(self) -> dict:
        open_row = self.packer.open if self.packer is not None else {}
        return {"epoch": self.epoch, "epoch_records": self._epoch_records, "reader": json.dumps(self._read_state),
                "pending": _flat_rows(list(self.pending)),
                "open": {name: torch.from_numpy(values.copy()) for name, values in open_row.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._epoch_records = state["epoch"], state["epoch_records"]
        self._read_state = json.loads(state["reader"])
        self.stream.set_epoch(self.epoch)
        self.stream.load_state_dict(self._read_state)
        self._records = iter(self.stream)
        self.pending = deque(_unflat_rows(state["pending"]))
        if self.packer is not None:
            self.packer.open = {name: values.numpy().astype(np.int32) for name, values in state["open"].items()}


def build_stream_batches(cfg: Config, tokenizer, collate, rank: int, world_size: int) -> StreamBatches:
    packer = Packer(cfg.data.max_length, split_examples=cfg.data.format == "text") if cfg.data.pack else None
    return StreamBatches(train_stream(cfg, tokenizer, rank, world_size), collate, cfg.train.micro_batch_size, packer)

