"""A deterministic instruction JSONL with long-tailed example lengths, like real SFT sets (Alpaca): the bundled
instructions, each given an `input` context cut from the bundled text corpus to a log-normal number of tokens
(the row's own input, if any, follows the context). Lengths are tokens of the shipped tokenizer.

    python benchmarks/mixed_data.py /tmp/mixed.jsonl    # writes the file and prints its length statistics
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from dist_tune.config import load_config
from dist_tune.data.formats import encode_instruction
from dist_tune.data.sources import resolve_path
from dist_tune.models import load_tokenizer

FIELDS = ("instruction", "input", "output")
UNTRUNCATED = 10 ** 9


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _instruction_config(max_length: int):
    return load_config(None, {"model.name_or_path": "small-llama", "data.format": "instruction",
                              "data.prompt_template": "alpaca", "data.max_length": max_length})


def example_lengths(rows: list[dict], tokenizer, max_length: int = UNTRUNCATED) -> np.ndarray:
    """Tokens per example as dist_tune trains on it (bos + alpaca prompt + output + eos, truncated to max_length;
    rows whose prompt alone reaches max_length are dropped)."""
    batch = {k: [row.get(k) or "" for row in rows] for k in FIELDS}
    encoded = encode_instruction(batch, tokenizer=tokenizer, cfg=_instruction_config(max_length))
    return np.array([len(ids) for ids in encoded["input_ids"]])


def length_stats(path: str, max_length: int) -> dict:
    """rows, min, median, mean, p90, max and total tokens per example of an instruction source (a file or
    bundled:NAME) at data.max_length."""
    lengths = example_lengths(_read_jsonl(resolve_path(path)), load_tokenizer(_instruction_config(max_length)),
                              max_length)
    return {"rows": len(lengths), "min": int(lengths.min()), "median": round(float(np.median(lengths)), 1),
            "mean": round(float(lengths.mean()), 1), "p90": round(float(np.percentile(lengths, 90)), 1),
            "max": int(lengths.max()), "total": int(lengths.sum())}


class Corpus:
    """The bundled text corpus as one string, with its token spans, cut into contexts of a given token count."""

    def __init__(self, tokenizer) -> None:
        texts = [row["text"] for row in _read_jsonl(resolve_path("bundled:text"))]
        self.text = " ".join(texts)
        self.spans = np.array(tokenizer(self.text, add_special_tokens=False, return_offsets_mapping=True,
                                        verbose=False)["offset_mapping"])
        doc_chars = np.cumsum([0] + [len(t) + 1 for t in texts[:-1]])
        self.doc_starts = np.searchsorted(self.spans[:, 1], doc_chars, side="right")  # token holding each doc start

    def starts(self, rng: np.random.Generator, n_tokens: np.ndarray) -> np.ndarray:
        """A random document start per context, early enough for n_tokens tokens to follow."""
        fits = np.searchsorted(self.doc_starts, len(self.spans) - n_tokens, side="right")
        return self.doc_starts[rng.integers(0, fits)]

    def cut(self, start: int, n_tokens: int) -> str:
        return self.text[self.spans[start, 0]:self.spans[start + n_tokens - 1, 1]].strip()


def _with_context(source: dict, context: str) -> dict:
    own = source.get("input") or ""
    return {"instruction": source["instruction"], "input": f"{context}\n\n{own}" if own else context,
            "output": source["output"]}


def write_mixed_instructions(path: str | Path, n_rows: int = 3000, seed: int = 0, median_tokens: float = 120,
                             sigma: float = 0.9, max_tokens: int = 1024) -> dict:
    """Write n_rows instruction rows to path (same seed → byte-identical file): bundled instructions drawn with a
    seeded numpy Generator, each with a corpus context of round(LogNormal(log(median_tokens), sigma)) tokens,
    shortened where the whole example would exceed max_tokens. Returns `length_stats` of the file."""
    tokenizer = load_tokenizer(_instruction_config(max_tokens))
    corpus = Corpus(tokenizer)
    rng = np.random.default_rng(seed)
    sources = _read_jsonl(resolve_path("bundled:instructions"))
    picked = [sources[i] for i in rng.choice(len(sources), size=n_rows, replace=n_rows > len(sources))]
    n_context = np.maximum(1, np.rint(rng.lognormal(np.log(median_tokens), sigma, n_rows))).astype(int)
    starts = corpus.starts(rng, n_context)
    rows = [_with_context(s, corpus.cut(start, n)) for s, start, n in zip(picked, starts, n_context)]
    while (excess := example_lengths(rows, tokenizer) - max_tokens).max() > 0:
        for i in np.flatnonzero(excess > 0):
            n_context[i] -= excess[i]
            if n_context[i] < 1:
                raise ValueError(f"max_tokens={max_tokens} leaves no room for a context in row {i} (its instruction "
                                 "and answer alone are longer); raise max_tokens")
            rows[i] = _with_context(picked[i], corpus.cut(starts[i], n_context[i]))
    Path(path).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return length_stats(str(path), max_tokens)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: python {sys.argv[0]} OUT.jsonl")
    print(json.dumps(write_mixed_instructions(sys.argv[1]), indent=2))
