"""`dist-tune prepare`: a training run's data preparation alone (its tokenizer, no model weights, no GPU), into
the cache directory the run will memory-map, and a report of what was prepared."""
from __future__ import annotations

import time

from dist_tune.config import Config
from dist_tune.data.pipeline import build_datasets, cache_dir
from dist_tune.data.mixture import Mixture
from dist_tune.data.prepared import manifests_of
from dist_tune.memory_probe import peak_host_rss_per_rank
from dist_tune.models import check_sequence_length, load_tokenizer

SUMMED = ("records", "examples", "dropped", "tokens", "at_max_length", "rows")


def _role_report(role: str, manifests: list[dict]) -> dict:
    """Totals over the role's sources; padding and lengths of the one source, or of the largest in a mixture."""
    report = {f"{role}_{key}": sum(m[key] for m in manifests) for key in SUMMED}
    largest = max(manifests, key=lambda m: m["tokens"])
    report.update({f"{role}_{key}": largest[key] for key in
                   ("padding_share", "length_p50", "length_p90", "length_p99", "length_max")})
    report[f"{role}_files"] = [f for m in manifests for f in m["files"]]
    return report


def prepare_data(cfg: Config) -> dict:
    """Prepare (or find already prepared) the train and validation rows of cfg; the report of prepare."""
    start = time.perf_counter()
    tokenizer = load_tokenizer(cfg)
    check_sequence_length(cfg, tokenizer)
    train, val = build_datasets(cfg, tokenizer)
    cache = cache_dir(cfg)
    report = {"cache_dir": str(cache), "max_length": cfg.data.max_length, "packed": cfg.data.pack,
              "streamed": cfg.data.streaming}
    for role, rows in (("train", train), ("validation", val)):
        if rows is not None:
            report.update(_role_report(role, manifests_of(cache, rows.rows if isinstance(rows, Mixture) else rows)))
    report["seconds"] = round(time.perf_counter() - start, 2)
    report["peak_host_rss_gib"] = round(peak_host_rss_per_rank()[0], 3)  # no process group: this process
    return report


def format_report(report: dict) -> str:
    """Human-readable lines: one per role, then the cache directory."""
    lines = ["train: streamed (data.streaming): read, tokenized and packed while training, so nothing to prepare"
             ] if report.get("streamed") else []
    for role in ("train", "validation"):
        if f"{role}_rows" not in report:
            continue
        r = {key[len(role) + 1:]: value for key, value in report.items() if key.startswith(f"{role}_")}
        lines += [f"{role}: {r['records']:,} records -> {r['examples']:,} examples ({r['dropped']:,} dropped, "
                  f"{r['at_max_length']:,} at max_length {report['max_length']}), {r['tokens']:,} tokens in "
                  f"{r['rows']:,} {'packed ' if report['packed'] else ''}rows, {r['padding_share']:.1%} padding at "
                  f"max_length",
                  f"{role} example length: p50 {r['length_p50']}, p90 {r['length_p90']}, p99 {r['length_p99']}, "
                  f"max {r['length_max']} tokens"]
    lines.append(f"prepared in {report['seconds']:.1f} s into {report['cache_dir']} (peak host RSS "
                 f"{report['peak_host_rss_gib']:.2f} GiB); a training run with the same data settings reuses it")
    return "\n".join(lines)
