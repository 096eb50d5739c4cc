"""The torch-side pieces of the GPU check, each run by check.py in its own process and printing one JSON line:

    python3 benchmarks/gpu/tasks.py probe                           # versions, device, requirement problems
    python3 benchmarks/gpu/tasks.py long-text OUT.jsonl ROWS TOKENS  # text rows of TOKENS tokens each
    python3 benchmarks/gpu/tasks.py mixed-data OUT.jsonl ROWS MEDIAN MAX
    python3 benchmarks/gpu/tasks.py save-base PRESET DIR             # random-init bf16 model directory
"""
from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PACKAGES = ("transformers", "peft", "accelerate", "deepspeed", "datasets", "pyarrow", "huggingface_hub",
            "safetensors", "bitsandbytes", "flash_attn", "pytest")
# Packages the check needs; each must be installed with its own declared requirements met.
NEEDED = ("transformers", "peft", "accelerate", "deepspeed", "datasets", "fire", "pytest")


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def requirement_problems(package: str) -> list[str]:
    """One line per unmet runtime requirement of a package (or its absence), e.g. a too old pyarrow for datasets."""
    from packaging.requirements import Requirement

    version = installed(package)
    if version is None:
        return [f"{package} is not installed; install .whl/ first (see the header of benchmarks/gpu/check.sh)"]
    problems = []
    for line in metadata.requires(package) or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        found = installed(req.name)
        if found is None:
            problems.append(f"{package} {version} needs {req}, which is not installed")
        elif not req.specifier.contains(found, prereleases=True):
            problems.append(f"{package} {version} needs {req}, found {req.name} {found} (too old or too new)")
    return problems


def probe() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    device = {"cuda_available": cuda, "gpu": torch.cuda.get_device_name(0) if cuda else None,
              "gpu_count": torch.cuda.device_count(),
              "gpu_mem_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
              "bf16_supported": bool(cuda and torch.cuda.is_bf16_supported())}
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                **{name: installed(name) for name in PACKAGES}}
    return {"versions": versions, **device, "problems": [p for name in NEEDED for p in requirement_problems(name)]}


def _tokenizer():
    from dist_tune.config import load_config
    from dist_tune.models import load_tokenizer

    return load_tokenizer(load_config(None, {"model.name_or_path": "tiny-llama"}))


def long_text(path: str, rows: int, tokens: int, seed: int = 0) -> dict:
    """Rows of `tokens` tokens cut from the bundled text corpus at seeded document starts: every row fills
    data.max_length <= tokens, so batches hold no padding."""
    import numpy as np
    from mixed_data import Corpus

    corpus = Corpus(_tokenizer())
    starts = corpus.starts(np.random.default_rng(seed), np.full(rows, tokens))
    Path(path).write_text("".join(json.dumps({"text": corpus.cut(s, tokens)}) + "\n" for s in starts),
                          encoding="utf-8")
    return {"rows": rows, "tokens": tokens}


def mixed_data(path: str, rows: int, median: int, max_tokens: int) -> dict:
    from mixed_data import write_mixed_instructions

    return write_mixed_instructions(path, n_rows=rows, median_tokens=median, max_tokens=max_tokens)


def save_base(preset: str, out_dir: str) -> dict:
    """A preset's random-init weights in bf16 as a save_pretrained directory (QLoRA quantises a local model).
    Built on the GPU when there is one: initialising billions of weights on the CPU takes minutes."""
    import torch

    from dist_tune.config import load_config
    from dist_tune.models import load_model, load_tokenizer

    cfg = load_config(None, {"model.name_or_path": preset, "model.dtype": "bfloat16"})
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, tokenizer, device="cuda" if torch.cuda.is_available() else "cpu")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"dir": out_dir, "params": sum(p.numel() for p in model.parameters())}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="task", required=True)
    sub.add_parser("probe")
    text = sub.add_parser("long-text")
    text.add_argument("path")
    text.add_argument("rows", type=int)
    text.add_argument("tokens", type=int)
    mixed = sub.add_parser("mixed-data")
    mixed.add_argument("path")
    mixed.add_argument("rows", type=int)
    mixed.add_argument("median", type=int)
    mixed.add_argument("max_tokens", type=int)
    base = sub.add_parser("save-base")
    base.add_argument("preset")
    base.add_argument("out_dir")
    args = vars(parser.parse_args(argv))
    task = {"probe": probe, "long-text": long_text, "mixed-data": mixed_data, "save-base": save_base}[args.pop("task")]
    print(json.dumps(task(**args)))


if __name__ == "__main__":
    main(sys.argv[1:])
