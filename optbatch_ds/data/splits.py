"""The splits of the generated instruction sets (demo.py, pydoc_demo.py): labelled defects, ids, stats, files.

Both sets draw their records from a `fresh(task, long_answer=False) -> messages` function that never returns the
same prompt twice, and build the same splits from it:

  train.jsonl        per task, clean records plus each defect at its rate, shuffled, ids "train-00000", ...
  train_clean.jsonl  the train records with defect == "none" (same order)
  eval.jsonl         n_eval_per_task clean records per task ("eval-00000", ...): the evaluation split
  reference.jsonl    n_reference_per_task clean records per task ("reference-00000", ...), disjoint from train and
                     eval: data to train a small reference model on (RHO-LOSS), never to evaluate on

Defects (train only): "duplicate" (an exact copy of the messages of a clean record of the same task),
"misaligned" (the final answer replaced by the final answer of another record, of any task), "truncated" (the
final answer cut mid-answer: whole words when it has several, else characters). Everything else is "none".
"""
from __future__ import annotations

import json
import os
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

# fresh(task, long_answer) -> messages: a record whose prompt was never returned before; long_answer asks for a
# final answer of at least 2 characters (one that truncation can cut).
Fresh = Callable[..., list]


@dataclass(frozen=True)
class SplitSpec:
    """Sizes, task mix and defect rates of a generated set. Rates are fractions of each task's train records;
    task_mix gives each task's share of the train records (normalised; None = the set's default mix).
    Subclasses name their tasks and default mix in the class variables."""

    tasks: ClassVar[tuple[str, ...]] = ()
    default_mix: ClassVar[dict[str, float]] = {}

    n_train: int = 3000
    n_eval_per_task: int = 100
    task_mix: dict | None = None
    duplicate_rate: float = 0.12
    misaligned_rate: float = 0.12
    truncated_rate: float = 0.06
    n_reference_per_task: int = 100

    def __post_init__(self):
        mix = self.mix
        unknown = set(mix) - set(self.tasks)
        if unknown or not mix or any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
            raise ValueError(f"task_mix must give non-negative shares for tasks among {self.tasks}, got {mix}")
        rates = (self.duplicate_rate, self.misaligned_rate, self.truncated_rate)
        if min(rates) < 0 or sum(rates) >= 1:
            raise ValueError("defect rates must be non-negative and sum to less than 1")
        if min(self.n_train, self.n_eval_per_task, self.n_reference_per_task) < 0:
            raise ValueError("n_train, n_eval_per_task and n_reference_per_task must be non-negative")

    @property
    def mix(self) -> dict[str, float]:
        return dict(self.default_mix if self.task_mix is None else self.task_mix)


def counts(total: int, shares: dict[str, float]) -> dict[str, int]:
    """Integer counts summing to `total`, proportional to shares (largest remainder)."""
    raw = {k: total * v for k, v in shares.items()}
    out = {k: int(r) for k, r in raw.items()}
    for k in sorted(raw, key=lambda k: (out[k] - raw[k], k))[: total - sum(out.values())]:
        out[k] += 1
    return out


def truncate(answer: str, rng: random.Random) -> str:
    """The answer cut short: its first 1..n-1 words when it has several, else its first 1..n-1 characters."""
    words = answer.split(" ")
    if len(words) >= 2:
        return " ".join(words[: rng.randint(1, len(words) - 1)])
    return answer[: rng.randint(1, len(answer) - 1)]


def numbered(records: list[dict], prefix: str) -> list[dict]:
    """The records with an "id" ("{prefix}-00000", ...) put first."""
    return [{"id": f"{prefix}-{i:05d}", **r} for i, r in enumerate(records)]


def train_records(spec: SplitSpec, rng: random.Random, fresh: Fresh) -> list[dict]:
    """The train records: per task, clean ones and each defect at its rate, shuffled and numbered.

    Raises ValueError when a task gets too few records to keep a clean one next to its defects."""
    mix = spec.mix
    total = sum(mix.values())
    per_task = counts(spec.n_train, {t: mix.get(t, 0) / total for t in spec.tasks})
    train: list[dict] = []
    for task in spec.tasks:
        n = per_task[task]
        n_dup, n_mis, n_trunc = (round(r * n) for r in (spec.duplicate_rate, spec.misaligned_rate,
                                                         spec.truncated_rate))
        n_none = n - n_dup - n_mis - n_trunc
        if n > 0 and n_none < 1:
            raise ValueError(f"task {task} gets {n} records, too few for the defect rates")
        clean = [{"task": task, "defect": "none", "messages": fresh(task)} for _ in range(n_none)]
        train += clean
        train += [{"task": task, "defect": "truncated", "messages": fresh(task, long_answer=True)}
                  for _ in range(n_trunc)]
        train += [{"task": task, "defect": "misaligned", "messages": fresh(task)} for _ in range(n_mis)]
        train += [{"task": task, "defect": "duplicate",
                   "messages": json.loads(json.dumps(rng.choice(clean)["messages"]))} for _ in range(n_dup)]
    _break_answers(train, rng)
    rng.shuffle(train)
    return numbered(train, "train")


def _break_answers(train: list[dict], rng: random.Random) -> None:
    """Cut the truncated records' answers and swap in another record's answer for the misaligned ones (in place)."""
    answers = [r["messages"][-1]["content"] for r in train]
    for r in train:
        last = r["messages"][-1]
        if r["defect"] == "truncated":
            last["content"] = truncate(last["content"], rng)
        elif r["defect"] == "misaligned":
            last["content"] = misaligned_answer(last["content"], answers, rng)


def misaligned_answer(correct: str, answers: list[str], rng: random.Random) -> str:
    """A random answer of `answers` that differs from `correct` (answers must hold one)."""
    wrong = correct
    while wrong == correct:
        wrong = rng.choice(answers)
    return wrong


def held_out(tasks: tuple[str, ...], n_per_task: int, fresh: Fresh, prefix: str) -> list[dict]:
    """n_per_task clean records per task, task by task, numbered with `prefix` (the eval and reference splits)."""
    return numbered([{"task": task, "defect": "none", "messages": fresh(task)}
                     for task in tasks for _ in range(n_per_task)], prefix)


def stats(records: list[dict]) -> dict:
    """Record counts: in all, by task, by defect and by task and defect."""
    by_td: dict[str, Counter] = {}
    for r in records:
        by_td.setdefault(r["task"], Counter())[r["defect"]] += 1
    return {"n": len(records), "by_task": dict(sorted(Counter(r["task"] for r in records).items())),
            "by_defect": dict(sorted(Counter(r["defect"] for r in records).items())),
            "by_task_defect": {t: dict(sorted(c.items())) for t, c in sorted(by_td.items())}}


def write_jsonl(path: str, rows: list[dict]) -> None:
    """One JSON object per line, UTF-8, non-ASCII kept as is (the byte layout the demo's files have always had)."""
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_splits(out_dir, splits: dict[str, list[dict]]) -> tuple[dict[str, str], dict[str, dict]]:
    """Write `{name}.jsonl` for each split, plus train_clean.jsonl (the train records with defect "none", same
    order) after train. Returns ({name: path}, {name: stats()}) for every file written. Raises OSError when
    out_dir cannot be created or written."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    splits = {"train": splits["train"], "train_clean": [r for r in splits["train"] if r["defect"] == "none"],
              **{k: v for k, v in splits.items() if k != "train"}}
    paths = {name: os.path.join(out_dir, f"{name}.jsonl") for name in splits}
    for name, records in splits.items():
        write_jsonl(paths[name], records)
    return paths, {name: stats(records) for name, records in splits.items()}


def corpus_stats(docs: list[dict]) -> dict:
    """Pretraining documents ({"kind", "text"} each): documents, characters and words in all, documents by kind."""
    return {"n_docs": len(docs), "n_chars": sum(len(d["text"]) for d in docs),
            "n_words": sum(len(d["text"].split()) for d in docs),
            "by_kind": dict(sorted(Counter(d["kind"] for d in docs).items()))}
