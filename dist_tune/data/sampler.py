"""A distributed, resumable sampler whose only state is (epoch, samples already consumed)."""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Yields this rank's strided share of a (seed, epoch)-seeded permutation, minus the first `skip` samples.

    drop_last=True trims the permutation to a multiple of world_size so every rank gets the same count;
    drop_last=False keeps every sample exactly once (shares then differ by at most one).
    epoch_rows maps an epoch to the num_samples dataset indices it visits (a Mixture's draw); the permutation
    then orders those instead of range(num_samples)."""

    def __init__(self, num_samples: int, *, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True, epoch_rows: Callable[[int], torch.Tensor] | None = None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.num_samples, self.shuffle, self.seed, self.epoch_rows = num_samples, shuffle, seed, epoch_rows
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch, self.skip = 0, 0

    def _share_length(self) -> int:
        if self.drop_last:
            return self.num_samples // self.world_size
        return len(range(self.rank, self.num_samples, self.world_size))

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch's permutation; `skip` = samples of this rank already consumed in that epoch."""
        if not 0 <= skip <= self._share_length():
            raise ValueError(f"skip={skip} is outside this rank's {self._share_length()} samples per epoch")
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.num_samples)
        if self.epoch_rows is not None:
            order = self.epoch_rows(self.epoch)[order]
        end = self._share_length() * self.world_size if self.drop_last else self.num_samples
        share = order[self.rank:end:self.world_size]
        return iter(share[self.skip:].tolist())

    def __len__(self) -> int:
        return self._share_length() - self.skip
