"""Held-out evaluation: mean response NLL, and per task exact match, BLEU-4 and ROUGE-L of greedy outputs.

Every rank evaluates an equal shard (padded by repetition, so ZeRO-3's collective forwards stay in
step); rank 0 gathers predictions and computes the metrics. The metric functions are pure.
"""
from __future__ import annotations

import math
import re
import string
from collections import defaultdict

import torch

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


def _shard(n: int, rank: int, world: int) -> list[int]:
    """Indices of rank's shard, every shard the same length (tail padded by repeating index 0..)."""
    per = math.ceil(n / world) if n else 0
    idx = list(range(rank * per, min(n, (rank + 1) * per)))
    while len(idx) < per:
        idx.append(idx[-1] if idx else 0)
    return idx


@torch.no_grad()
def evaluate(engine, tokenizer, examples, encoded, *, rank: int, world: int, batch_size: int,
             max_new_tokens: int, samples_per_task: int = 0, synced_gpus: bool = False) -> dict | None:
    """Run on every rank; returns the result on rank 0 (None elsewhere).

    `examples` are held-out `optbatch_ds.data.Example`s, `encoded` their `Encoded` (None = unusable)."""
    from optbatch_ds import comm
    from optbatch_ds.data import encode_prompt, split_for_generation
    from optbatch_ds.trainer import collate, per_sample_nll

    model = engine.module
    was_training = model.training
    model.eval()
    device = engine.device
    usable = [i for i, e in enumerate(encoded) if e is not None and e.n_supervised > 0]

    # 1. Mean response NLL over every usable held-out sample.
    losses: dict[int, float] = {}
    shard = [usable[i] for i in _shard(len(usable), rank, world)]
    for s in range(0, len(shard), batch_size):
        ids = shard[s:s + batch_size]
        batch = collate([encoded[i] for i in ids], tokenizer.pad_token_id, device)
        out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        for i, l in zip(ids, per_sample_nll(out.logits, batch["labels"]).tolist()):
            losses[i] = l

    # 2. Greedy generation on (a capped number of) samples per task.
    by_task = defaultdict(list)
    for i in usable:
        by_task[examples[i].task].append(i)
    gen_ids = [i for t in sorted(by_task) for i in (by_task[t][:samples_per_task] if samples_per_task else by_task[t])]
    preds: dict[int, str] = {}
    shard = [gen_ids[i] for i in _shard(len(gen_ids), rank, world)]
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for s in range(0, len(shard), batch_size):
            ids = shard[s:s + batch_size]
            prompts = [encode_prompt(split_for_generation(examples[i])[0], tokenizer) for i in ids]
            width = max(len(p) for p in prompts)
            input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(ids), width), dtype=torch.long)
            for r, p in enumerate(prompts):
                input_ids[r, width - len(p):] = torch.tensor(p)
                mask[r, width - len(p):] = 1
            out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                 synced_gpus=synced_gpus)
            for r, i in enumerate(ids):
                preds[i] = tokenizer.decode(out[r, width:], skip_special_tokens=True).strip()
    finally:
        tokenizer.padding_side = old_side
    if was_training:
        model.train()

    gathered = comm.all_gather_objects((losses, preds))
    if rank != 0:
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
