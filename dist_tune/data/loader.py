"""DataLoader construction for training and evaluation."""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from dist_tune.config import Config
from dist_tune.data.collate import make_collator
from dist_tune.data.mixture import Mixture
from dist_tune.data.sampler import ResumableSampler
from dist_tune.errors import DataError


def _seed_worker(worker_id: int) -> None:
    """Seed Python and NumPy in a worker from its torch seed (itself derived from the loader's generator)."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def build_loader(dataset, cfg: Config, tokenizer, *, rank: int, world_size: int, shuffle: bool,
                 seed: int) -> tuple[DataLoader, ResumableSampler]:
    """Training loader (shuffle=True: shuffled, equal whole batches on every rank) or evaluation loader
    (shuffle=False: every sample once across ranks, last batch may be partial); a Mixture is drawn anew each
    epoch. Resume via sampler.set_epoch."""
    sampler = ResumableSampler(len(dataset), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size,
                               drop_last=shuffle,
                               epoch_rows=dataset.epoch_rows if isinstance(dataset, Mixture) else None)
    batch_size = cfg.train.micro_batch_size
    if shuffle and len(sampler) < batch_size:
        raise DataError(f"the training set has {len(dataset)} rows, fewer than one batch of train.micro_batch_size="
                        f"{batch_size} per rank on {world_size} rank(s); lower train.micro_batch_size or add data")
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=make_collator(cfg, tokenizer),
                        num_workers=cfg.data.num_workers, pin_memory=cfg.data.pin_memory, drop_last=shuffle,
                        worker_init_fn=_seed_worker, generator=torch.Generator().manual_seed(seed + rank))
    return loader, sampler


@dataclass
class EpochBatches:
    """This rank's training micro-batches from a prepared dataset, epoch after epoch; its place is the
    TrainState's (epoch, samples_in_epoch), which `take` advances."""

    loader: DataLoader
    world_size: int

    def __post_init__(self) -> None:
        self._it = None

    @property
    def sampler(self) -> ResumableSampler:
        return self.loader.sampler

    def _start_epoch(self, state) -> None:
        self.sampler.set_epoch(state.epoch, consumed=state.samples_in_epoch)
        self._it = iter(self.loader)

    def take(self, state, count: int) -> list[dict]:
        """`count` micro-batches, moving to the next epoch when this one runs short."""
        per_rank = self.loader.batch_size * count
        if self._it is None:
            self._start_epoch(state)
        if self.sampler.share_length(state.samples_in_epoch) < per_rank:
            state.epoch, state.samples_in_epoch = state.epoch + 1, 0
            self._start_epoch(state)
        batches = [next(self._it) for _ in range(count)]
        state.samples_in_epoch += per_rank * self.world_size
        return batches

    def epoch_progress(self, state) -> float:
        return state.epoch + state.samples_in_epoch / self.sampler.num_samples

    def state_dict(self) -> None:
        """Nothing beyond the TrainState: the sampler's order is a function of (seed, epoch)."""
        return None
