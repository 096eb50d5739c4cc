"""A distributed, resumable sampler whose only state is (epoch, samples of the epoch consumed by all ranks)."""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Yields this rank's strided share of a (seed, epoch)-seeded permutation, after the first `consumed` positions
    of that permutation (the samples all ranks, at any world size, already trained on in the epoch).

    drop_last=True trims what is left to a multiple of world_size so every rank gets the same count;
    drop_last=False keeps every sample exactly once (shares then differ by at most one).
    epoch_rows maps an epoch to the num_samples dataset indices it visits (a Mixture's draw); the permutation
    then orders those instead of range(num_samples)."""

    def __init__(self, num_samples: int, *, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True, epoch_rows: Callable[[int], torch.Tensor] | None = None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.num_samples, self.shuffle, self.seed, self.epoch_rows = num_samples, shuffle, seed, epoch_rows
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch, self.consumed = 0, 0

    def share_length(self, consumed: int) -> int:
        """Samples this rank gets from the epoch once `consumed` of its positions are used up."""
        left = self.num_samples - consumed
        if self.drop_last:
            return left // self.world_size
        return len(range(self.rank, left, self.world_size))

    def set_epoch(self, epoch: int, consumed: int = 0) -> None:
        """Select the epoch's permutation; `consumed` = samples of that epoch already trained on, over all ranks."""
        if not 0 <= consumed <= self.num_samples:
            raise ValueError(f"consumed={consumed} is outside the epoch's {self.num_samples} samples")
        self.epoch, self.consumed = epoch, consumed

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.num_samples)
        if self.epoch_rows is not None:
            order = self.epoch_rows(self.epoch)[order]
        left = order[self.consumed:]
        end = self.share_length(self.consumed) * self.world_size if self.drop_last else len(left)
        return iter(left[self.rank:end:self.world_size].tolist())

    def __len__(self) -> int:
        return self.share_length(self.consumed)
