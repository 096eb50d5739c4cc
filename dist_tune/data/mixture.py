"""Weighted mixtures of data.sources: every epoch draws each source's share of rows from an endless, reshuffled
stream of that source, so the epoch order is a function of (train.seed, epoch, the sources) alone."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import datasets
import numpy as np
import torch

from dist_tune.config import Config, SourceConfig


def source_config(cfg: Config, source: SourceConfig) -> Config:
    """cfg whose data section reads this one source: its path, format and field overrides, and no sources."""
    overrides = {k: v for k, v in dataclasses.asdict(source).items() if v is not None and k != "weight"}
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sources=[], **overrides))


def draws(sizes: list[int], weights: list[float]) -> list[int]:
    """Rows each source gives one epoch: the epoch has sum(sizes) rows, split by weight (largest remainder)."""
    total = sum(sizes)
    quotas = np.asarray(weights, dtype=np.float64) / sum(weights) * total
    counts = np.floor(quotas).astype(np.int64)
    remainders = np.argsort(-(quotas - counts), kind="stable")
    counts[remainders[:total - int(counts.sum())]] += 1
    return counts.tolist()


def _stream(size: int, start: int, count: int, key: list[int]) -> np.ndarray:
    """Items [start, start + count) of a source's stream: pass after pass of fresh permutations of its rows."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    first, last = start // size, (start + count - 1) // size
    passes = np.concatenate([np.random.default_rng([*key, p]).permutation(size) for p in range(first, last + 1)])
    offset = start - first * size
    return passes[offset:offset + count]


@dataclass(frozen=True)
class Mixture(torch.utils.data.Dataset):
    """Every source's rows one after another (`rows`); `epoch_rows(epoch)` is the epoch's draw from them
    (row indices, source by source; the sampler shuffles them). Source i gives `draws[i]` rows per epoch,
    continuing its stream where the last epoch stopped: a source drawn more than its size repeats rows within an
    epoch, one drawn less sees the rest of its rows in the next epochs."""

    rows: datasets.Dataset
    sizes: tuple[int, ...]
    draws: tuple[int, ...]
    seed: int

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        return self.rows.__getitems__(indices)

    def epoch_rows(self, epoch: int) -> torch.Tensor:
        offsets = np.cumsum([0, *self.sizes[:-1]])
        parts = [offset + _stream(size, epoch * draw, draw, [self.seed % 2**32, i])
                 for i, (offset, size, draw) in enumerate(zip(offsets, self.sizes, self.draws))]
        return torch.from_numpy(np.concatenate(parts))


def mix(parts: list[datasets.Dataset], weights: list[float], seed: int) -> Mixture:
    sizes = [len(part) for part in parts]
    return Mixture(datasets.concatenate_datasets(parts), tuple(sizes), tuple(draws(sizes, weights)), seed)


def describe(mixture: Mixture, sources: list[SourceConfig], default_format: str) -> list[str]:
    """One line per source: rows, weight, rows per epoch and realised share."""
    epoch = sum(mixture.draws)
    return [f"data.sources[{i}] {s.path} ({s.format or default_format}, weight {s.weight:g}): {size:,} rows, "
            f"{draw:,} per epoch ({draw / epoch:.1%})"
            for i, (s, size, draw) in enumerate(zip(sources, mixture.sizes, mixture.draws))]
