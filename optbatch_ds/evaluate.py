"""Held-out evaluation: mean response NLL, and per task exact match, BLEU-4 and ROUGE-L of greedy outputs.

Every rank evaluates an equal shard (padded by repetition, so ZeRO-3's collective forwards stay in
step); rank 0 gathers predictions and computes the metrics. The metric functions are pure.
"""
from __future__ import annotations

import re
import string
from collections import defaultdict
from dataclasses import dataclass

import torch

from optbatch_ds import comm
from optbatch_ds.batching import collate, padded_shard, per_sample_nll
from optbatch_ds.data import encode_prompt, split_for_generation, stop_token_ids

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]+$")


def normalize_answer(text: str) -> str:
    """Lower case, collapse whitespace, drop trailing punctuation: 'Oslo.' == 'oslo'."""
    text = " ".join(text.strip().lower().split())
    return _PUNCT.sub("", text).strip()


def exact_match(predictions: list[str], references: list[str]) -> float:
    if not references:
        return float("nan")
    hits = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references))
    return 100.0 * hits / len(references)


def bleu4(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU-4 (sacrebleu, its default 13a tokenisation), 0-100."""
    import sacrebleu

    if not references:
        return float("nan")
    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure (rouge-score), 0-100."""
    from rouge_score import rouge_scorer

    if not references:
        return float("nan")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return 100.0 * sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)) / len(references)


def task_metrics(predictions: list[str], references: list[str]) -> dict:
    return {"exact_match": exact_match(predictions, references), "bleu4": bleu4(predictions, references),
            "rougeL": rouge_l(predictions, references), "n": len(references)}


def format_table(result: dict) -> str:
    """The evaluation as a fixed-width table (one row per task)."""
    lines = [f"held-out loss {result['loss']:.4f}",
             f"{'task':<14}{'n':>6}{'loss':>9}{'EM':>8}{'BLEU-4':>9}{'ROUGE-L':>9}"]
    for task, m in sorted(result["tasks"].items()):
        lines.append(f"{task:<14}{m['n']:>6}{m.get('loss', float('nan')):>9.4f}{m['exact_match']:>8.1f}"
                     f"{m['bleu4']:>9.1f}{m['rougeL']:>9.1f}")
    return "\n".join(lines)


@dataclass(frozen=True)
class EvalSettings:
    """How held-out evaluation runs: forwards of `batch_size` samples, greedy decoding of `max_new_tokens`
    tokens on at most `samples_per_task` samples per task (0: all); synced_gpus under multi-rank ZeRO-3,
    whose forwards are collective (a rank that finished decoding keeps stepping with the others)."""

    batch_size: int
    max_new_tokens: int
    samples_per_task: int = 0
    synced_gpus: bool = False


def _heldout_losses(engine, tokenizer, encoded, usable: list[int], batch_size: int) -> dict[int, float]:
    """Mean response NLL of this rank's shard of the usable held-out samples, by index."""
    rank, world = comm.rank_and_world()
    losses: dict[int, float] = {}
    shard = padded_shard(usable, rank, world)
    for s in range(0, len(shard), batch_size):
        ids = shard[s:s + batch_size]
        batch = collate([encoded[i] for i in ids], tokenizer.pad_token_id, engine.device)
        out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        for i, l in zip(ids, per_sample_nll(out.logits, batch["labels"]).tolist()):
            losses[i] = l
    return losses


def _greedy(engine, tokenizer, examples, gen_ids: list[int], settings: EvalSettings) -> dict[int, str]:
    """Greedy answers of this rank's shard of `gen_ids`, left-padded batches, by index. Decoding stops at any
    token that ends an assistant turn under the chat template (eos, <|im_end|>, ...), as the export does."""
    rank, world = comm.rank_and_world()
    stops = stop_token_ids(tokenizer) or tokenizer.eos_token_id
    preds: dict[int, str] = {}
    shard = padded_shard(gen_ids, rank, world)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for s in range(0, len(shard), settings.batch_size):
            ids = shard[s:s + settings.batch_size]
            prompts = [encode_prompt(split_for_generation(examples[i])[0], tokenizer, examples[i].tools) for i in ids]
            width = max(len(p) for p in prompts)
            input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(ids), width), dtype=torch.long)
            for r, p in enumerate(prompts):
                input_ids[r, width - len(p):] = torch.tensor(p)
                mask[r, width - len(p):] = 1
            out = engine.module.generate(input_ids=input_ids.to(engine.device), attention_mask=mask.to(engine.device),
                                         max_new_tokens=settings.max_new_tokens, do_sample=False, num_beams=1,
                                         pad_token_id=tokenizer.pad_token_id, eos_token_id=stops,
                                         synced_gpus=settings.synced_gpus)
            for r, i in enumerate(ids):
                preds[i] = tokenizer.decode(out[r, width:], skip_special_tokens=True).strip()
    finally:
        tokenizer.padding_side = old_side
    return preds


@torch.no_grad()
def evaluate(engine, tokenizer, examples, encoded, settings: EvalSettings) -> dict | None:
    """Held-out loss and per-task generation metrics. Collective: run on every rank; rank 0 gets the result
    ({"loss", "tasks": {task: {"exact_match", "bleu4", "rougeL", "loss", "n"}}, "skipped_unusable",
    "samples"}), the others None.

    `examples` are held-out `optbatch_ds.data.Example`s, `encoded` their `Encoded` (None = unusable)."""
    model = engine.module
    was_training = model.training
    model.eval()
    usable = [i for i, e in enumerate(encoded) if e is not None and e.n_supervised > 0]
    losses = _heldout_losses(engine, tokenizer, encoded, usable, settings.batch_size)
    by_task = defaultdict(list)
    for i in usable:
        by_task[examples[i].task].append(i)
    cap = settings.samples_per_task
    gen_ids = [i for t in sorted(by_task) for i in (by_task[t][:cap] if cap else by_task[t])]
    preds = _greedy(engine, tokenizer, examples, gen_ids, settings)
    if was_training:
        model.train()
    gathered = comm.all_gather_objects((losses, preds))
    if comm.rank_and_world()[0] != 0:
        return None
    all_losses, all_preds = {}, {}
    for l, p in gathered:
        all_losses.update(l)
        all_preds.update(p)
    result = {"loss": float(sum(all_losses.values()) / max(len(all_losses), 1)), "tasks": {},
              "skipped_unusable": len(encoded) - len(usable)}
    for task in sorted(by_task):
        ids = [i for i in gen_ids if examples[i].task == task]
        refs = [split_for_generation(examples[i])[1] for i in ids]
        m = task_metrics([all_preds[i] for i in ids], refs)
        task_losses = [all_losses[i] for i in by_task[task]]
        m["loss"] = float(sum(task_losses) / len(task_losses))
        result["tasks"][task] = m
    result["samples"] = [{"task": examples[i].task, "prediction": all_preds[i],
                          "reference": split_for_generation(examples[i])[1]} for i in gen_ids[:50]]
    return result
