"""Data layer: sources (files, shard directories, hf:NAME), formats (text, instruction, classification, chat),
tokenization and packing into memory-mapped cache files (prepared once per job or node), weighted mixtures of
several sources, collation and a resumable distributed sampler."""
from dist_tune.data.collate import make_collator
from dist_tune.data.formats import prompt_for, prompt_ids
from dist_tune.data.loader import build_loader
from dist_tune.data.once import prepare_once
from dist_tune.data.pipeline import build_datasets, cache_dir
from dist_tune.data.sampler import ResumableSampler
from dist_tune.data.sources import load_records

__all__ = ["ResumableSampler", "build_datasets", "build_loader", "cache_dir", "load_records", "make_collator",
           "prepare_once", "prompt_for", "prompt_ids"]
