"""The data position is the global count of samples consumed: a resume at any world size continues on exactly the
next samples of the epoch's order."""
from __future__ import annotations

import json

import pytest

from dist_tune import checkpoint as ckpt
from dist_tune.data.sampler import ResumableSampler

N, SEED, EPOCH = 103, 7, 2


def take(world_size: int, consumed: int, per_rank: int) -> list[int]:
    """The samples all ranks train on in one step of `per_rank` each, in the epoch's order (rank-interleaved)."""
    shares = []
    for rank in range(world_size):
        sampler = ResumableSampler(N, shuffle=True, seed=SEED, rank=rank, world_size=world_size)
        sampler.set_epoch(EPOCH, consumed=consumed)
        shares.append(list(sampler)[:per_rank])
    return [shares[r][i] for i in range(per_rank) for r in range(world_size)]


def test_resume_at_another_world_size_continues_on_the_next_samples_of_the_epoch_order():
    order = take(1, 0, N)
    # 3 steps of 8 samples on 2 ranks (micro 4), 2 on 4 ranks (micro 2), 1 on 2 ranks again: the same global batch
    consumed, seen = 0, []
    for world_size, steps in ((2, 3), (4, 2), (2, 1)):
        for _ in range(steps):
            seen += take(world_size, consumed, 8 // world_size)
            consumed += 8
    assert seen == order[:48]


def test_same_world_size_resume_equals_the_old_per_rank_skip():
    for world_size in (1, 2, 3):
        for rank in range(world_size):
            sampler = ResumableSampler(N, shuffle=True, seed=SEED, rank=rank, world_size=world_size)
            sampler.set_epoch(EPOCH)
            full = list(sampler)
            sampler.set_epoch(EPOCH, consumed=5 * world_size)
            assert list(sampler) == full[5:] and len(sampler) == len(full) - 5


def test_what_is_left_is_trimmed_to_equal_shares():
    sampler = ResumableSampler(N, shuffle=True, seed=SEED, rank=3, world_size=4)
    sampler.set_epoch(EPOCH, consumed=24)  # 79 left: 19 per rank, 3 dropped
    assert len(sampler) == len(list(sampler)) == 19 == sampler.share_length(24)
    with pytest.raises(ValueError, match="consumed=104 is outside the epoch's 103 samples"):
        sampler.set_epoch(EPOCH, consumed=104)


def write_state(path, state: dict, ranks: int):
    path.mkdir(parents=True)
    (path / ckpt.STATE_FILE).write_text(json.dumps(state))
    (path / ckpt.COMPLETE).write_text("ok\n")
    for rank in range(ranks):
        (path / f"rng_rank{rank}.pt").write_bytes(b"")


def test_a_checkpoint_from_before_global_positions_converts_with_its_world_size(tmp_path):
    path = tmp_path / "step_00000003"
    write_state(path, {"step": 3, "epoch": 0, "batches_in_epoch": 3, "model_name": "tiny-llama"}, ranks=2)
    assert ckpt.is_complete(path)
    state = ckpt.read_state(path, micro_batch_size=4)
    assert (state.samples_in_epoch, state.world_size) == (24, 2)
