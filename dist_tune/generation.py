"""Generation evaluation: greedy answers to the first validation prompts, scored against their references with
exact match, corpus BLEU (sacrebleu) and ROUGE-1/2/L F-measure (rouge-score).

Every rank decodes its share of the prompts with the engine's own (possibly sharded) model, the same number of
forward calls on every rank, so FSDP and ZeRO-3 gather their shards as in any other forward; the answers are then
gathered to every rank, which all compute the same metrics."""
from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from dist_tune.config import VIRTUAL_TOKEN_METHODS, Config
from dist_tune.engines.base import Engine
from dist_tune.loss import IGNORE
from dist_tune.logs import warn_once

log = logging.getLogger(__name__)

GENERATIONS_FILE = "generations.jsonl"
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@dataclass(frozen=True)
class Sample:
    """One validation example split into the tokens the model is prompted with and the reference answer."""
    prompt: list[int]
    reference: list[int]


def split_example(input_ids: list[int], labels: list[int]) -> Sample | None:
    """The prompt is everything before the example's last target span, the reference that span (the response
    and its end token: an instruction's output, a conversation's last assistant turn); None without a prompt."""
    end = max((i + 1 for i, label in enumerate(labels) if label != IGNORE), default=0)
    start = end
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    if start == 0:
        return None
    return Sample(prompt=list(input_ids[:start]), reference=list(input_ids[start:end]))


def examples(rows: Iterator[dict[str, list[int]]]) -> Iterator[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each example, packed rows split where their position_ids restart at 0."""
    for row in rows:
        positions = row.get("position_ids")
        if positions is None:
            yield row["input_ids"], row["labels"]
            continue
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        for a, b in zip(starts[:-1], starts[1:]):
            yield row["input_ids"][a:b], row["labels"][a:b]


def first_samples(val_set: Any, n: int) -> list[Sample]:
    """The first n validation examples that have a prompt and a reference."""
    samples = []
    for input_ids, labels in examples(iter(val_set)):
        sample = split_example(input_ids, labels)
        if sample is not None:
            samples.append(sample)
        if len(samples) == n:
            break
    return samples


def skip_reason(cfg: Config) -> str | None:
    """Why this run's data has no prompt/response pairs to generate from (None: it has)."""
    if cfg.data.format not in ("instruction", "chat"):
        return f"data.format={cfg.data.format} has no prompt/response pairs"
    if cfg.data.format == "chat" and cfg.data.train_on == "all":
        return "data.train_on=all makes the whole conversation the target, so no turn is a prompt"
    return None


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with every prompt right-aligned."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = torch.as_tensor(prompt, dtype=torch.long)
        mask[i, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def cut_at_stop(tokens: list[int], stop_ids: set[int]) -> list[int]:
    return next((tokens[:i] for i, t in enumerate(tokens) if t in stop_ids), tokens)


@functools.cache
def cache_keyword() -> str:
    """The forward keyword (and output field) of the KV cache: `cache` since transformers renamed
    `past_key_values`, which then still works but warns."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@torch.no_grad()
def greedy_decode(forward: Callable[[dict], Any], prompts: list[list[int]], *, max_new_tokens: int, pad_id: int,
                  stop_ids: set[int], device: torch.device, incremental: bool = True,
                  keep_going: Callable[[bool], bool] = bool) -> list[list[int]]:
    """Greedy continuations of `prompts` (batched, left-padded), each cut before its first stop token.

    incremental: feed only the new token with the KV cache (else the whole sequence each step, as prompt and
    prefix tuning need). keep_going(this batch has an unfinished row) says whether to run another step; across
    ranks it must give every rank the same answer, so all of them call `forward` equally often."""
    ids, mask = left_pad(prompts, pad_id, device)
    width, cache, fed, cache_key = ids.shape[1], None, 0, cache_keyword()
    stops = torch.tensor(sorted(stop_ids), device=device)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        inputs = {"input_ids": ids, "attention_mask": mask, "logits_to_keep": 1, "use_cache": incremental}
        if incremental:
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            inputs.update({"input_ids": ids[:, fed:], "position_ids": positions[:, fed:], cache_key: cache})
        output = forward(inputs)
        cache, fed = (getattr(output, cache_key) if incremental else None), ids.shape[1]
        token = output.logits[:, -1].argmax(-1).masked_fill(finished, pad_id)
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(token)[:, None]], dim=1)
        finished |= torch.isin(token, stops)
        if not keep_going(not bool(finished.all())):
            break
    return [cut_at_stop(row, stop_ids) for row in ids[:, width:].tolist()]


def generation_metrics(outputs: list[str], references: list[str]) -> dict[str, float]:
    """eval/exact_match (share equal after stripping whitespace), eval/bleu (sacrebleu corpus BLEU, 0-100) and
    eval/rouge1, rouge2, rougeL (rouge-score F-measure, mean over samples)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES))
    scores = [scorer.score(ref, out) for out, ref in zip(outputs, references)]
    metrics = {"eval/exact_match": sum(o.strip() == r.strip() for o, r in zip(outputs, references)) / len(outputs),
               "eval/bleu": sacrebleu.corpus_bleu(outputs, [references]).score}
    for kind in ROUGE_TYPES:
        metrics[f"eval/{kind}"] = sum(s[kind].fmeasure for s in scores) / len(scores)
    return metrics


def stop_token_ids(engine: Engine, tokenizer) -> set[int]:
    """The tokenizer's eos and any the model's generation config names (e.g. an end-of-turn token)."""
    configured = getattr(getattr(engine.unwrap(), "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    return {t for t in (tokenizer.eos_token_id, *configured) if t is not None}


def _all_gather(local: dict[int, list[int]]) -> dict[int, list[int]]:
    if not (dist.is_available() and dist.is_initialized()):
        return local
    parts: list[dict[int, list[int]]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(parts, local)
    return {i: tokens for part in parts for i, tokens in part.items()}


def decode_samples(cfg: Config, engine: Engine, samples: list[Sample], tokenizer) -> list[list[int]]:
    """Greedy answers to every sample, in order, on every rank. Batches of train.micro_batch_size go round-robin
    to the ranks; a rank with one batch fewer decodes a discarded copy of the first, so all ranks run the same
    number of batches. Prompt and prefix tuning decode one sample at a time without a KV cache."""
    env = engine.env
    incremental = cfg.peft.method not in VIRTUAL_TOKEN_METHODS
    size = cfg.train.micro_batch_size if incremental else 1
    batches = [range(i, min(i + size, len(samples))) for i in range(0, len(samples), size)]
    mine = batches[env.rank::env.world_size]
    rounds = math.ceil(len(batches) / env.world_size)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    stop_ids = stop_token_ids(engine, tokenizer)

    def keep_going(unfinished: bool) -> bool:
        return bool(engine.all_reduce_max(torch.tensor(int(unfinished), device=engine.device)))

    local: dict[int, list[int]] = {}
    for r in range(rounds):
        batch = mine[r] if r < len(mine) else batches[0]
        outputs = greedy_decode(engine.forward, [samples[i].prompt for i in batch],
                                max_new_tokens=cfg.eval.max_new_tokens, pad_id=pad_id, stop_ids=stop_ids,
                                device=engine.device, incremental=incremental, keep_going=keep_going)
        if r < len(mine):
            local.update(zip(batch, outputs))
    gathered = _all_gather(local)
    return [gathered[i] for i in range(len(samples))]


def generation_eval(cfg: Config, engine: Engine, val_set: Any, tokenizer) -> tuple[dict[str, float], list[dict]]:
    """Metrics and {prompt (as the model saw it, special tokens included), reference, output} rows for the first
    eval.generate_samples validation examples; none when that is 0, or for data without prompts (one warning
    says why). Collective: every rank calls it, with the model in eval mode."""
    if not cfg.eval.generate_samples:
        return {}, []
    reason = skip_reason(cfg)
    if reason:
        warn_once(f"eval.generate_samples={cfg.eval.generate_samples} skipped: {reason}; generation metrics are "
                  "for instruction and chat data")
        return {}, []
    samples = first_samples(val_set, cfg.eval.generate_samples)
    if not samples:
        return {}, []
    outputs = decode_samples(cfg, engine, samples, tokenizer)

    def text(tokens: list[int]) -> str:
        return tokenizer.decode(tokens, skip_special_tokens=True).strip()

    rows = [{"prompt": tokenizer.decode(s.prompt), "reference": text(s.reference), "output": text(out)}
            for s, out in zip(samples, outputs)]
    return generation_metrics([r["output"] for r in rows], [r["reference"] for r in rows]), rows


def format_answers(rows: list[dict], special_tokens: list[str], shown: int = 3) -> str:
    """The end-of-run block: exact match over the validation prompts answered (as eval/exact_match counts it)
    and the first `shown` prompts with their expected and generated answers, one line each part."""
    right = [row["output"].strip() == row["reference"].strip() for row in rows]
    lines = [f"exact match on {len(rows)} held-out validation prompts: {sum(right) / len(rows):.1%} "
             f"({sum(right)} of {len(rows)})"]
    for row, ok in list(zip(rows, right))[:shown]:
        prompt = row["prompt"]
        for token in special_tokens:
            prompt = prompt.replace(token, "")
        lines += [f"  prompt:   {' | '.join(line for line in prompt.splitlines() if line.strip())}",
                  f"  expected: {row['reference']}", f"  model:    {row['output']}  ({'right' if ok else 'wrong'})"]
    return "\n".join(lines)


def write_generations(rows: list[dict], run_dir: Path) -> None:
    """generations.jsonl: one {prompt, reference, output} object per line, replacing the previous eval's."""
    path = Path(run_dir) / GENERATIONS_FILE
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    tmp.replace(path)
