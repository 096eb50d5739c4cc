"""Data layer: sources (files, shard directories, hf:NAME), formats (text, instruction, classification, chat),
cached tokenization, packing, weighted mixtures of several sources, collation and a resumable distributed
sampler."""
from dist_tune.data.collate import make_collator
from dist_tune.data.formats import prompt_for, prompt_ids
from dist_tune.data.loader import build_loader
from dist_tune.data.pipeline import build_datasets
from dist_tune.data.sampler import ResumableSampler
from dist_tune.data.sources import load_records

__all__ = ["ResumableSampler", "build_datasets", "build_loader", "load_records", "make_collator", "prompt_for",
           "prompt_ids"]
