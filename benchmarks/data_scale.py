"""Data at cluster scale: cold `dist-tune prepare` of synthetic raw-text corpora of growing size against a plain
`datasets` tokenization of the same file, and the warm start of `dist-tune train` on the prepared cache.

    python benchmarks/data_scale.py                                   # 20M and 200M tokens, num_proc 1 and 2
    python benchmarks/data_scale.py --sizes 20M,200M,1B --packed both
    python benchmarks/data_scale.py --sizes 1M --num-procs 1 --json-out /tmp/d.json --results-md ''   # smoke test

Corpora: JSONL, one {"text"} row per ~2,000-token document of words drawn uniformly (seeded) from the distinct
words of the bundled text corpus (200; the shipped tokenizer, trained on that corpus, makes each one token); words
per token are calibrated once on a sample with that tokenizer. Each corpus is written once, streaming, into --cache
and reused; the runs' caches go under --cache/work and are removed after each size. For each size:

  cold      `python -m dist_tune.cli prepare` (format text, max_length 512, validation_split 0.001, data.pack per
            --packed) with data.num_proc=N and a fresh data.cache_dir: wall time, tokens/s, and the peak RSS of the
            process tree, polled every 0.2 s with psutil (the largest single process, and the sum over the tree),
            and the largest process's anonymous part (RSS less its file-backed pages: reading a memory-mapped Arrow
            file puts its pages in the reader's RSS, up to the file's size, but they are page cache the kernel
            drops under pressure; the anonymous part is the memory the process holds).
  baseline  the same file through `datasets.load_dataset("json", cache_dir=fresh)` + a batched map writing bos + ids
            + eos (input_ids only) with num_proc=N (1: in-process) and the same tokenizer, in a subprocess measured
            the same way.
  warm      `dist-tune train` for one step (micro-batch 2, no checkpoint, one eval batch) on the cache the first
            cold run prepared, at 1 rank (engine single) and 2 ranks (ddp under torchrun, gloo): wall time to the
            end, and each rank's peak host RSS at the end of loading and over the run (summary.json), plus how many
            files the run added to the cache (0: nothing was prepared again).

tokens/s = the corpus's tokens (bos + document + eos, as the baseline counts them) / wall time, process startup
included, for both systems. Every process runs one thread (OMP_NUM_THREADS=1, TOKENIZERS_PARALLELISM=false), so
num_proc is the only parallelism.

Targets (issue "Data at cluster scale"), checked at the end:
  - warm per-rank peak RSS (ru_maxrss, file-backed pages included) grows by <= 0.2 GiB from the smallest size to
    the size 10x larger (20M -> 200M);
  - the warm start at the 10x size takes <= 2x as long as at the smallest;
  - cold preparation's peak anonymous RSS (largest process) <= 1.5 GiB for corpora up to 200M tokens;
  - cold preparation's rate >= 0.9x the baseline's at the same num_proc;
  - cold preparation with num_proc=2 >= 1.6x as fast as with num_proc=1.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from common import cpu_model, git_commit, write_report
from memory_per_engine import free_port

ROOT = Path(__file__).resolve().parents[1]
GIB = 2 ** 30
DOC_TOKENS = 2000
MAX_LENGTH = 512
VALIDATION_SPLIT = 0.001
POLL_S = 0.2
UNITS = {"": 1, "K": 10 ** 3, "M": 10 ** 6, "B": 10 ** 9}
ENV = {**{k: v for k, v in os.environ.items()
          if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")},
       "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
TARGETS = {"warm_rss_growth_gib": 0.2, "warm_time_ratio": 2.0, "cold_peak_gib": 1.5, "cold_peak_up_to": 200 * 10 ** 6,
           "vs_baseline": 0.9, "num_proc_2_speedup": 1.6}


def parse_size(text: str) -> int:
    """20M -> 20_000_000 (K, M, B suffixes)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMB]?)\s*", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"size {text!r} is not like 20M, 1B or 500K")
    return int(float(match[1]) * UNITS[match[2]])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="20M,200M", help="corpus sizes in tokens, comma list (K, M, B suffixes)")
    p.add_argument("--num-procs", default="1,2", help="data.num_proc / datasets num_proc values, comma list")
    p.add_argument("--packed", choices=("true", "false", "both"), default="true", help="data.pack of the cold runs")
    p.add_argument("--ranks", default="1,2", help="world sizes of the warm starts, comma list")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also time load_dataset + map on each corpus (--no-baseline: the dist_tune runs alone)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "dist_tune_data_scale"),
                   help="where the corpora are written once and the runs' caches go")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    p.add_argument("--json-out", default=str(ROOT / "benchmarks" / "results" / "data_scale_cpu.json"))
    p.add_argument("--results-md", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = p.parse_args(argv)
    try:
        args.size_list = sorted(((label.strip(), parse_size(label)) for label in args.sizes.split(",")),
                                key=lambda item: item[1])
    except argparse.ArgumentTypeError as exc:
        p.error(str(exc))
    args.num_proc_list = [int(n) for n in args.num_procs.split(",")]
    args.ranks_list = [int(r) for r in args.ranks.split(",")]
    args.packed_list = {"true": [True], "false": [False], "both": [True, False]}[args.packed]
    return args


def bundled_tokenizer():
    from dist_tune.config import Config
    from dist_tune.models import load_tokenizer

    cfg = Config()
    cfg.model.name_or_path = "tiny-llama"
    return load_tokenizer(cfg)


def word_list() -> np.ndarray:
    """The distinct words of the bundled text corpus, sorted."""
    from dist_tune.data.sources import resolve_path

    lines = resolve_path("bundled:text").read_text(encoding="utf-8").splitlines()
    text = " ".join(json.loads(line)["text"] for line in lines if line.strip())
    return np.array(sorted(set(re.findall(r"[A-Za-z]+", text))), dtype=object)


def words_per_document(words: np.ndarray, seed: int, sample_words: int = 100_000) -> int:
    """Words making DOC_TOKENS tokens, calibrated on a sample of corpus text with the shipped tokenizer."""
    sample = " ".join(words[np.random.default_rng(seed).integers(len(words), size=sample_words)])
    tokens = len(bundled_tokenizer()(sample, add_special_tokens=False, verbose=False)["input_ids"])
    return round(DOC_TOKENS * sample_words / tokens)


def corpus(cache: Path, label: str, tokens: int, words: np.ndarray, per_doc: int, seed: int) -> dict:
    """The corpus of ~`tokens` tokens (written on first use, one document at a time): its path and shape."""
    docs = max(1, round(tokens / DOC_TOKENS))
    path = cache / f"text-{label}-{docs}x{per_doc}w-seed{seed}.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        rng = np.random.default_rng(seed)
        with open(partial, "w", encoding="utf-8") as f:
            for _ in range(docs):
                f.write(json.dumps({"text": " ".join(words[rng.integers(len(words), size=per_doc)])}) + "\n")
        partial.rename(path)
    return {"path": str(path), "documents": docs, "words_per_document": per_doc,
            "estimated_tokens": docs * (DOC_TOKENS + 2), "bytes": path.stat().st_size}


def tree_rss(root: psutil.Process) -> tuple[int, int, int]:
    """RSS bytes of the largest process in root's tree, of the whole tree, and the largest anonymous part (RSS less
    file-backed pages: the memory-mapped Arrow files a process reads count in its RSS, but the kernel drops them
    under pressure; the anonymous part is what it holds)."""
    rss, anon = [], []
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0, 0, 0
    for proc in procs:
        try:
            info = proc.memory_info()
        except psutil.Error:
            continue
        rss.append(info.rss)
        anon.append(info.rss - info.shared)
    return max(rss, default=0), sum(rss), max(anon, default=0)


def last_json(stdout: str) -> dict:
    """The JSON object on stdout's last non-empty line ({} if there is none)."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    try:
        value = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def run_polled(cmd: list[str], timeout: float) -> dict:
    """Run cmd to its end, polling its process tree's RSS every POLL_S: wall seconds, the peak RSS of the largest
    process and of the tree (GiB), and the last stdout line as JSON, or the error."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        popen = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=out, stderr=err, start_new_session=True)
        root, peak_one, peak_tree, peak_anon, timed_out = psutil.Process(popen.pid), 0, 0, 0, False
        while True:
            one, tree, anon = tree_rss(root)
            peak_one, peak_tree, peak_anon = max(peak_one, one), max(peak_tree, tree), max(peak_anon, anon)
            try:
                popen.wait(timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                if time.perf_counter() - start > timeout:
                    os.killpg(popen.pid, signal.SIGKILL)
                    popen.wait()
                    timed_out = True
                    break
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    result = {"seconds": round(seconds, 2), "peak_process_gib": round(peak_one / GIB, 3),
              "peak_tree_gib": round(peak_tree / GIB, 3), "peak_anon_gib": round(peak_anon / GIB, 3)}
    if timed_out or popen.returncode != 0:
        lines = [line.strip() for line in (stdout + stderr).splitlines() if line.strip()] or [""]
        why = ([line for line in lines if "error" in line.lower()] or lines)[-1]
        result["error"] = f"timed out after {timeout} s" if timed_out else f"exit {popen.returncode}: {why}"
    else:
        result["output"] = last_json(stdout)
    return result


def baseline(path: str, cache_dir: str, num_proc: int) -> None:
    """The baseline (run in its own process): load the JSONL with datasets, tokenize bos + ids + eos in a batched
    map (num_proc=1 in this process, datasets' fastest way, not in one pool worker); prints {"tokens", "rows"}."""
    import datasets
    import pyarrow.compute as pc

    tokenizer = bundled_tokenizer()
    bos, eos = [tokenizer.bos_token_id], [tokenizer.eos_token_id]

    def encode(batch: dict) -> dict:
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [bos + x + eos for x in ids]}

    raw = datasets.load_dataset("json", data_files=path, cache_dir=cache_dir, split="train")
    encoded = raw.map(encode, batched=True, remove_columns=raw.column_names,
                      num_proc=num_proc if num_proc > 1 else None)
    tokens = pc.sum(pc.list_value_length(encoded.data.column("input_ids"))).as_py()
    print(json.dumps({"tokens": tokens, "rows": len(encoded)}))


def data_args(path: str, cache_dir: Path, packed: bool, num_proc: int) -> list[str]:
    return ["--model.name_or_path=tiny-llama", f"--data.path={path}", "--data.format=text",
            f"--data.pack={str(packed).lower()}", f"--data.max_length={MAX_LENGTH}",
            f"--data.validation_split={VALIDATION_SPLIT}", f"--data.cache_dir={cache_dir}",
            f"--data.num_proc={num_proc}"]


def cold(path: str, cache_dir: Path, packed: bool, num_proc: int, timeout: float) -> dict:
    """`dist-tune prepare` into a fresh cache_dir; the JSON it ends with is kept as `reported`."""
    shutil.rmtree(cache_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "dist_tune.cli", "prepare", *data_args(path, cache_dir, packed, num_proc)]
    result = run_polled(cmd, timeout)
    result["reported"] = result.pop("output", {})
    return {"system": "dist_tune", "packed": packed, "num_proc": num_proc, **result}


def base(path: str, cache_dir: Path, num_proc: int, timeout: float) -> dict:
    """The baseline in a subprocess with a fresh cache_dir, removed afterwards."""
    shutil.rmtree(cache_dir, ignore_errors=True)
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from data_scale import baseline; "
            f"baseline({path!r}, {str(cache_dir)!r}, {num_proc})")
    result = run_polled([sys.executable, "-c", code], timeout)
    shutil.rmtree(cache_dir, ignore_errors=True)
    result["reported"] = result.pop("output", {})
    return {"system": "baseline", "packed": None, "num_proc": num_proc, **result}


def cache_files(cache_dir: Path) -> set[Path]:
    return {p for p in cache_dir.rglob("*") if p.is_file() and not p.name.endswith(".lock")}


def warm(path: str, cache_dir: Path, packed: bool, num_proc: int, ranks: int, runs: Path, timeout: float) -> dict:
    """One training step on the prepared cache: wall seconds and each rank's peak RSS from summary.json."""
    name = f"warm-ranks{ranks}"
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
                     f"--master_port={free_port()}"]
    cmd = [*launcher, "-m", "dist_tune.cli", "train", *data_args(path, cache_dir, packed, num_proc),
           f"--engine.kind={'ddp' if ranks > 1 else 'single'}", "--train.device=cpu", "--train.max_steps=1",
           "--train.micro_batch_size=2", "--train.eval_steps=null", "--train.eval_max_batches=1", "--train.resume=none",
           f"--train.output_dir={runs}", f"--train.run_name={name}", "--checkpoint.save_steps=null",
           "--checkpoint.save_final=false", "--log.progress=false", "--log.wandb.mode=disabled",
           "--eval.generate_samples=0"]
    before = cache_files(cache_dir)
    result = run_polled(cmd, timeout)
    result.pop("output", None)
    result["new_cache_files"] = len(cache_files(cache_dir) - before)
    summary_file = runs / name / "summary.json"
    if "error" not in result and summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        result["load_peak_gib"] = summary.get("load_peak_host_rss_gib_per_rank")
        result["peak_gib"] = summary.get("peak_host_rss_gib_per_rank")
    return {"ranks": ranks, "packed": packed, **result}


def add_rates(rows: list[dict], tokens: int) -> None:
    """tokens/s of every finished cold row; its rate over the baseline's at the same num_proc, and over its own
    at num_proc=1."""
    for row in rows:
        if "error" not in row:
            row["tokens_per_s"] = round(tokens / row["seconds"])
    rate = {(r["system"], r["packed"], r["num_proc"]): r.get("tokens_per_s") for r in rows}
    for row in (r for r in rows if "tokens_per_s" in r):
        base_rate = rate.get(("baseline", None, row["num_proc"]))
        one = rate.get((row["system"], row["packed"], 1))
        if row["system"] == "dist_tune" and base_rate:
            row["vs_baseline"] = round(row["tokens_per_s"] / base_rate, 3)
        if row["num_proc"] != 1 and one:
            row["vs_num_proc_1"] = round(row["tokens_per_s"] / one, 3)


def measure_size(args: argparse.Namespace, label: str, tokens: int, words: np.ndarray, per_doc: int) -> dict:
    """Corpus, baselines, cold preparations and warm starts of one size; its work folder is removed after."""
    entry = {"size": label, "requested_tokens": tokens,
             **corpus(Path(args.cache), label, tokens, words, per_doc, args.seed)}
    print(f"{label}: corpus {entry['path']} ({entry['bytes'] / GIB:.2f} GiB)", flush=True)
    work = Path(args.cache) / "work" / label
    shutil.rmtree(work, ignore_errors=True)
    rows = []
    for n in args.num_proc_list if args.baseline else []:
        rows.append(base(entry["path"], work / f"baseline-np{n}", n, args.timeout))
        print(f"{label}: baseline num_proc={n}: {rows[-1]}", flush=True)
    kept = {}  # packed -> (cache dir, num_proc) of its first successful preparation, for the warm starts
    for packed in args.packed_list:
        for n in args.num_proc_list:
            cache_dir = work / f"prepare-pack{int(packed)}-np{n}"
            rows.append(cold(entry["path"], cache_dir, packed, n, args.timeout))
            print(f"{label}: prepare pack={packed} num_proc={n}: {rows[-1]}", flush=True)
            if packed not in kept and "error" not in rows[-1]:
                kept[packed] = (cache_dir, n)
            else:
                shutil.rmtree(cache_dir, ignore_errors=True)
    counted = [r["reported"]["tokens"] for r in rows if r["system"] == "baseline" and "tokens" in r.get("reported", {})]
    entry["tokens"], entry["tokens_counted"] = (counted[0], True) if counted else (entry["estimated_tokens"], False)
    add_rates(rows, entry["tokens"])
    entry["cold"], entry["warm"] = rows, []
    for packed, (cache_dir, n) in kept.items():
        for ranks in args.ranks_list:
            entry["warm"].append(warm(entry["path"], cache_dir, packed, n, ranks, work / "runs", args.timeout))
            print(f"{label}: warm start, pack={packed}, {ranks} rank(s): {entry['warm'][-1]}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return entry


def check(target: str, measured: list[tuple[str, float, bool]]) -> dict:
    """A target, its measured values by label, and whether all meet it (None: nothing measured)."""
    return {"target": target, "measured": {label: round(value, 3) for label, value, _ in measured},
            "met": all(ok for *_, ok in measured) if measured else None}


def warm_checks(small: dict, big: dict | None) -> list[dict]:
    """Per-rank peak RSS growth and warm-start slowdown from the smallest size to the one 10x larger."""
    t = TARGETS
    pair = f"{small['size']} -> {big['size'] if big else '(no size 10x the smallest)'}"
    larger = {(r["packed"], r["ranks"]): r for r in (big or {}).get("warm", []) if r.get("peak_gib")}
    growth, slowdown = [], []
    for a in (r for r in small["warm"] if r.get("peak_gib") and (r["packed"], r["ranks"]) in larger):
        b, where = larger[a["packed"], a["ranks"]], f"pack={str(a['packed']).lower()} ranks={a['ranks']}"
        growth += [(f"{where} rank {i}", y - x, y - x <= t["warm_rss_growth_gib"])
                   for i, (x, y) in enumerate(zip(a["peak_gib"], b["peak_gib"]))]
        ratio = b["seconds"] / a["seconds"]
        slowdown.append((where, ratio, ratio <= t["warm_time_ratio"]))
    return [check(f"warm per-rank peak RSS growth {pair} <= {t['warm_rss_growth_gib']} GiB", growth),
            check(f"warm start time {pair} <= {t['warm_time_ratio']}x", slowdown)]


def cold_checks(sizes: list[dict]) -> list[dict]:
    """Peak RSS up to 200M tokens, rate against the baseline and num_proc=2 speed-up of every cold preparation."""
    t = TARGETS
    rows = [(f"{s['size']} pack={str(r['packed']).lower()} num_proc={r['num_proc']}", s["requested_tokens"], r)
            for s in sizes for r in s["cold"] if r["system"] == "dist_tune" and "error" not in r]
    return [
        check(f"cold preparation peak anonymous RSS (largest process) <= {t['cold_peak_gib']} GiB up to 200M tokens",
              [(where, r["peak_anon_gib"], r["peak_anon_gib"] <= t["cold_peak_gib"])
               for where, tokens, r in rows if tokens <= t["cold_peak_up_to"]]),
        check(f"cold preparation rate >= {t['vs_baseline']}x the baseline's at the same num_proc",
              [(where, r["vs_baseline"], r["vs_baseline"] >= t["vs_baseline"])
               for where, _, r in rows if "vs_baseline" in r]),
        check(f"cold preparation num_proc=2 >= {t['num_proc_2_speedup']}x num_proc=1",
              [(where, r["vs_num_proc_1"], r["vs_num_proc_1"] >= t["num_proc_2_speedup"])
               for where, _, r in rows if r["num_proc"] == 2 and "vs_num_proc_1" in r]),
    ]


def fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def per_rank(values: list[float] | None) -> str:
    return ", ".join(f"{v:.2f}" for v in values or [])


def cold_line(size: str, r: dict) -> str:
    packed = "" if r["packed"] is None else str(r["packed"]).lower()
    if "error" in r:
        return f"| {size} | {r['system']} | {packed} | {r['num_proc']} | failed: {r['error']} | | | | | |"
    return (f"| {size} | {r['system']} | {packed} | {r['num_proc']} | {r['seconds']:.1f} | "
            f"{r['tokens_per_s'] / 1e6:.3f} | {r['peak_process_gib']:.2f} / {r['peak_tree_gib']:.2f} | "
            f"{r['peak_anon_gib']:.2f} | "
            f"{fmt(r.get('vs_baseline'))} | {fmt(r.get('vs_num_proc_1'))} |")


def warm_line(size: str, r: dict) -> str:
    if "error" in r:
        return f"| {size} | {str(r['packed']).lower()} | {r['ranks']} | failed: {r['error']} | | | |"
    return (f"| {size} | {str(r['packed']).lower()} | {r['ranks']} | {r['seconds']:.1f} | {per_rank(r.get('load_peak_gib'))} | "
            f"{per_rank(r.get('peak_gib'))} | {r['new_cache_files']} |")


def verdict(c: dict) -> str:
    values = ", ".join(f"{label}: {value}" for label, value in c["measured"].items()) or "not measured"
    return f"- {c['target']}: {values} -> {'-' if c['met'] is None else 'yes' if c['met'] else 'NO'}"


def table(sizes: list[dict], results: list[dict]) -> str:
    corpora = "; ".join(f"{s['size']}: {s['tokens'] / 1e6:.1f}M tokens{'' if s['tokens_counted'] else ' (estimated)'}, "
                        f"{s['documents']} documents, {s['bytes'] / GIB:.2f} GiB" for s in sizes)
    return (f"### Data at cluster scale (CPU), {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}\n\n"
            f"Corpora {corpora}. Text, max_length {MAX_LENGTH}, validation_split {VALIDATION_SPLIT}. "
            f"{cpu_model()}, commit {git_commit()}, load average {os.getloadavg()[0]:.1f}. "
            f"`python benchmarks/data_scale.py {' '.join(sys.argv[1:])}`\n\n"
            "| size | system | packed | num_proc | seconds | M tokens/s | peak RSS GiB (process / tree) | "
            "peak anonymous GiB | x baseline | x num_proc=1 |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
            + "".join(cold_line(s["size"], r) + "\n" for s in sizes for r in s["cold"])
            + "\n| size | packed | ranks | warm start seconds | peak RSS GiB per rank, end of loading | "
              "peak RSS GiB per rank | new cache files |\n| --- | --- | --- | --- | --- | --- | --- |\n"
            + "".join(warm_line(s["size"], r) + "\n" for s in sizes for r in s["warm"])
            + "\nTargets:\n\n" + "".join(verdict(c) + "\n" for c in results))


def main() -> None:
    args = parse_args()
    words = word_list()
    per_doc = words_per_document(words, args.seed)
    sizes = [measure_size(args, label, tokens, words, per_doc) for label, tokens in args.size_list]
    big = next((s for s in sizes if s["requested_tokens"] == 10 * sizes[0]["requested_tokens"]), None)
    results = warm_checks(sizes[0], big) + cold_checks(sizes)
    report = {"cpu": cpu_model(), "commit": git_commit(), "load_average": os.getloadavg(), "max_length": MAX_LENGTH,
              "validation_split": VALIDATION_SPLIT, "document_tokens": DOC_TOKENS, "seed": args.seed,
              "sizes": sizes, "checks": results}
    write_report(report, table(sizes, results), args.json_out, args.results_md)


if __name__ == "__main__":
    main()
