"""Does a model already know the answers? NLL of the correct against wrong final answers of instruction records.

    model, tok = load_model("bench_out/pretrain/pretrained_base_<key>")
    print(format_table(answer_nll(model, tok, "data/train.jsonl")))
    results = check(base_dir, "data/train.jsonl", "data/reference.jsonl", warmup_steps=(0, 50))   # base vs scratch

For each clean record (defect "none"; up to max_per_task per task, a seeded sample), two wrong twins are made with
splits.misaligned_answer: the final answer of another clean record of the same task (same format and length, so
the comparison is about content: does the model know the fact?) and of any task (what the data's "misaligned"
defect does, so what the selector sees). All are scored with the package's own chat template and loss mask
(encode_examples, collate, per_sample_nll):
  answer NLL   mean token NLL (nats) over the final assistant turn only (its content and closing token)
  sample NLL   the per-sample loss the trainer and the selector see (every assistant turn)
`wins` is the share of pairs whose correct answer has the lower NLL.

A base pretrained on plain text has never seen the chat template's role tokens, so before any fine-tuning the
format tokens (the first answer token after <|assistant|>, the closing </s>) cost several nats each and blur the
comparison. `check` therefore also scores after a short chat warm-up (a few steps of supervised fine-tuning on
the clean reference split, disjoint from the scored train records), and scores a freshly initialised model of the
same architecture and tokenizer given the same warm-up (the from-scratch control): what the base brings beyond the
format is the gap between the two. Used by launch/pretrain_base.py --check.
"""
from __future__ import annotations

import random
from dataclasses import replace

import torch

from optbatch_ds.batching import collate, per_sample_nll
from optbatch_ds.data import IGNORE_INDEX, encode_examples, load_examples
from optbatch_ds.data.splits import misaligned_answer

WRONG = ("same_task", "any_task")  # where a wrong answer comes from: another record of the same task, or of any


def _with_answer(example, answer: str):
    messages = [dict(m) for m in example.messages]
    messages[-1]["content"] = answer
    return replace(example, messages=messages)


def _final_turn_only(encoded):
    """A copy of an Encoded whose labels keep only the last run of supervised tokens (the final answer)."""
    labels = list(encoded.labels)
    end = max(i for i, l in enumerate(labels) if l != IGNORE_INDEX) + 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    labels = [IGNORE_INDEX] * start + labels[start:end] + [IGNORE_INDEX] * (len(labels) - end)
    return replace(encoded, labels=labels, n_supervised=end - start)


@torch.no_grad()
def _nll(model, encoded: list, pad_id: int, batch_size: int, device) -> torch.Tensor:
    """(len(encoded),) per-sample mean token NLL, in batches."""
    out = []
    for at in range(0, len(encoded), batch_size):
        batch = collate(encoded[at: at + batch_size], pad_id, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        out.append(per_sample_nll(logits, batch["labels"]).cpu())
    return torch.cat(out)


def _pairs(records_path: str, max_per_task: int, seed: int) -> tuple[list, dict[str, list]]:
    """(correct, {"same_task": wrong, "any_task": wrong}): clean Examples of each task (a seeded sample) and two
    wrong twins of each: the final answer of another clean record of the same task, and of any task (what the
    "misaligned" defect does)."""
    clean = [e for e in load_examples(records_path) if e.meta.get("defect", "none") == "none"]
    rng = random.Random(seed)
    by_task: dict[str, list] = {}
    for e in clean:
        by_task.setdefault(e.task, []).append(e)
    correct = [e for task in sorted(by_task) for e in rng.sample(by_task[task], min(max_per_task, len(by_task[task])))]
    pools = {"any_task": {t: [e.messages[-1]["content"] for e in clean] for t in by_task},
             "same_task": {t: [e.messages[-1]["content"] for e in recs] for t, recs in by_task.items()}}
    wrong = {kind: [_with_answer(e, misaligned_answer(e.messages[-1]["content"], pool[e.task], rng))
                    for e in correct] for kind, pool in pools.items()}
    return correct, wrong


def _summary(nll: dict[str, torch.Tensor]) -> dict:
    """Mean NLL of the correct and of each kind of wrong answer, and the share of pairs the correct one wins."""
    out = {"correct": nll["correct"].mean().item()}
    for kind in WRONG:
        out[kind] = nll[kind].mean().item()
        out[f"wins_{kind}"] = (nll["correct"] < nll[kind]).float().mean().item()
    return out


def load_model(model_dir: str, device="cpu", scratch_seed: int | None = None):
    """(model in eval mode on device, tokenizer) of model_dir; with scratch_seed, a freshly initialised model of the
    same config (seeded) instead of its weights: the from-scratch control, with the same tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from optbatch_ds.modeling import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    if scratch_seed is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    else:
        torch.manual_seed(scratch_seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return model.to(device).eval(), tokenizer


def _clean_encoded(records_path: str, tokenizer, max_seq_len: int) -> list:
    examples = [e for e in load_examples(records_path) if e.meta.get("defect", "none") == "none"]
    return encode_examples(examples, tokenizer, max_seq_len)


def chat_warmup(model, tokenizer, records_path: str, steps: int, seed: int = 0, learning_rate: float = 1e-3,
                max_seq_len: int = 256) -> list[float]:
    """Fine-tune the model in place for `steps` AdamW steps of 16 clean records each (seeded draws) with the
    package's loss (mean per-sample NLL over assistant tokens): enough to learn the chat format. Returns the
    step losses; leaves the model in eval mode."""
    encoded = _clean_encoded(records_path, tokenizer, max_seq_len)
    device = next(model.parameters()).device
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    model.train()
    losses = []
    for _ in range(steps):
        batch = collate(rng.sample(encoded, min(16, len(encoded))), tokenizer.pad_token_id, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = per_sample_nll(logits, batch["labels"]).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def answer_nll(model, tokenizer, records_path: str, seed: int = 0, max_per_task: int = 300,
               max_seq_len: int = 256) -> dict:
    """Per task: {"n", "answer": {...}, "sample": {...}}, each {"correct", "same_task", "any_task" (mean NLL in
    nats/token), "wins_same_task", "wins_any_task" (share of pairs whose correct answer has the lower NLL)}, and
    the same over all tasks under "all". Raises DataError when the records cannot be loaded."""
    device = next(model.parameters()).device
    correct, wrong = _pairs(records_path, max_per_task, seed)
    encoded = {"correct": encode_examples(correct, tokenizer, max_seq_len),
               **{kind: encode_examples(wrong[kind], tokenizer, max_seq_len) for kind in WRONG}}
    nll = {part: {name: _nll(model, [pick(e) for e in enc], tokenizer.pad_token_id, 32, device)
                  for name, enc in encoded.items()}
           for part, pick in (("answer", _final_turn_only), ("sample", lambda e: e))}
    tasks = [e.task for e in correct]
    out = {}
    for task in sorted(set(tasks)) + ["all"]:
        mask = torch.tensor([task in ("all", t) for t in tasks])
        out[task] = {"n": int(mask.sum()),
                     **{part: _summary({k: v[mask] for k, v in by_name.items()}) for part, by_name in nll.items()}}
    return out


def check(model_dir: str, train_path: str, reference_path: str, warmup_steps=(0, 50), seed: int = 0,
          device="cpu", max_seq_len: int = 256) -> dict:
    """{"base@<steps>" / "scratch@<steps>": answer_nll on the train records} for the model at model_dir and a
    freshly initialised one of its architecture, after each number of chat warm-up steps on the reference
    records (0: as they are). Records are encoded at `max_seq_len` tokens (the training runs' --max-seq-len);
    raises DataError for a record with no answer token left within it."""
    out = {}
    for which in ("base", "scratch"):
        for steps in warmup_steps:
            model, tokenizer = load_model(model_dir, device, scratch_seed=seed if which == "scratch" else None)
            if steps:
                chat_warmup(model, tokenizer, reference_path, steps, seed, max_seq_len=max_seq_len)
            out[f"{which}@{steps}"] = answer_nll(model, tokenizer, train_path, seed, max_seq_len=max_seq_len)
    return out


def format_table(result: dict, title: str = "") -> str:
    """Markdown tables of one answer_nll result: final-answer NLL, then per-sample loss."""
    lines = []
    for part, name in (("answer", "answer NLL"), ("sample", "sample NLL")):
        lines += [f"| {title} task | n | {name}: correct | wrong, same task | wins | wrong, any task | wins |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for task, r in result.items():
            p = r[part]
            lines.append(f"| {task} | {r['n']} | {p['correct']:.3f} | {p['same_task']:.3f} | "
                         f"{p['wins_same_task']:.2f} | {p['any_task']:.3f} | {p['wins_any_task']:.2f} |")
        lines.append("")
    return "\n".join(lines).rstrip()
