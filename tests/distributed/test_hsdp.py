"""HSDP: engine.replicate_degree=2 on 4 gloo ranks (2 replicas × 2 shards) trains with the single-device losses and
those of plain FSDP on the same 4 ranks; ZeRO-3 with the same key (ZeRO++ hpZ partitions of 2) does too."""
from __future__ import annotations

import pytest

from helpers import TINY, dist_tune, read_metrics

pytestmark = pytest.mark.slow

STEPS = 3


def run(root, name, *extra, nproc=1):
    proc = dist_tune("train", *TINY, f"--train.max_steps={STEPS}", "--log.log_steps=1", "--optim.lr=3e-3",
                     "--train.eval_steps=null", "--checkpoint.save_final=false", f"--train.output_dir={root}",
                     f"--train.run_name={name}", *extra, nproc=nproc)
    return proc, read_metrics(root / name)


@pytest.fixture(scope="module")
def single(runs_root):
    """One device, micro-batch 16: the same 16 sequences per step as 4 ranks × micro-batch 4."""
    return run(runs_root, "hsdp-single", "--train.micro_batch_size=16")[1]


def test_two_by_two_hsdp_matches_single_device_and_plain_fsdp(runs_root, single):
    _, fsdp = run(runs_root, "fsdp-4", "--engine.kind=fsdp", nproc=4)
    proc, hsdp = run(runs_root, "hsdp-2x2", "--engine.kind=fsdp", "--engine.replicate_degree=2", nproc=4)
    assert "FSDP mesh {'replicate': 2, 'shard': 2}" in proc.stderr
    assert single.keys() == fsdp.keys() == hsdp.keys() == set(range(1, STEPS + 1))
    for step in single:
        assert hsdp[step] == pytest.approx(single[step], rel=1e-4), step
        assert hsdp[step] == pytest.approx(fsdp[step], rel=1e-5), step


def test_zero3_hpz_matches_single_device(runs_root, single):
    _, hpz = run(runs_root, "zero3-hpz-2x2", "--engine.kind=deepspeed", "--engine.zero_stage=3",
                 "--engine.replicate_degree=2", nproc=4)
    assert single.keys() == hpz.keys() == set(range(1, STEPS + 1))
    for step in single:
        assert hpz[step] == pytest.approx(single[step], rel=1e-4), step
