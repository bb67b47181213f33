"""The pydoc instruction set: a second benchmark set, from real text every Python installation carries offline.

    python -c "from optbatch_ds.data.pydoc_demo import make_pydoc_data; print(make_pydoc_data('out/pydoc')['stats'])"

Source: the standard library's docstrings and pydoc_data.topics (pydoc_source.py). Each documented API is put in
exactly one of three partitions (a seeded shuffle): eval (2.5 x n_eval_per_task APIs), reference
(2.5 x n_reference_per_task) and train (the rest); a split's records only ever show APIs of its own partition, and
no train or reference record contains the summary of an eval API. Tasks (answers of 1 to 15 words):
  recall          fact recall, for the fine-tuning regime: "What does `posixpath.basename` do?" -> "Returns the
                  final component of a pathname." (the docstring's first sentence). Every API's docstring is in
                  the pretraining corpus (in help() form), so an eval question asks about a fact the corpus
                  states and no train record does; a model trained from scratch cannot answer it.
  lookup          extractive: "Which of these is described as "<summary>"?" followed by 3 APIs with their
                  summaries, one per line -> the matching API's name. Determined by the prompt.
  first_sentence  extractive: a docstring (or a paragraph of the language reference), at most 60 words of at
                  least two sentences, one paragraph per line -> its first sentence. Determined by the prompt.

Files written to out_dir (messages format with "id", "task", "defect"; the layout of the demo set, splits.py):
train.jsonl (default 4000 records: recall 40%, lookup 35%, first_sentence 25%; defects at the demo's rates: 12%
duplicate, 12% misaligned, 6% truncated, per task), train_clean.jsonl, eval.jsonl (100 per task), reference.jsonl
(100 per task), pretrain.jsonl (the corpus: {"id", "kind", "text"} documents of kinds "help" (a module's APIs
with signature and docstring, as help() prints them), "index" (a module's APIs, one "name -- summary" line each)
and "topic" (pydoc_data.topics, cut at paragraphs)) and meta.json (the Python version, platform and source counts:
the files are deterministic for a given seed, Python version and platform).
"""
from __future__ import annotations

import json
import os
import platform
import random
import re
import sys
from dataclasses import dataclass
from typing import ClassVar

from .pydoc_source import MODULES, ApiDoc, Passage, api_docs, first_sentence, missing_modules, topic_passages
from .splits import SplitSpec, corpus_stats, held_out, train_records, write_jsonl, write_splits

TASKS = ("recall", "lookup", "first_sentence")
DEFAULT_TASK_MIX = {"recall": 0.40, "lookup": 0.35, "first_sentence": 0.25}
SPLITS = ("eval", "reference", "train")
HELD_OUT_APIS_PER_RECORD = 2.5  # partition size over records per task: room for lookup options and passages

_RECALL = {"function": ["What does `{}` do?", "In one sentence, what does `{}` do?", "What is `{}` for?"],
           "method": ["What does the method `{}` do?", "In one sentence, what does `{}` do?", "What is `{}` for?"],
           "class": ["What is `{}`?", "In one sentence, what is `{}`?", "Describe the class `{}`."]}


@dataclass(frozen=True)
class PydocSpec(SplitSpec):
    """Sizes, task mix and defect rates of the pydoc set (SplitSpec's rates; 4000 train records), the lookup
    options per question, the passage length of first_sentence and the docstring length in the corpus."""

    tasks: ClassVar[tuple[str, ...]] = TASKS
    default_mix: ClassVar[dict[str, float]] = DEFAULT_TASK_MIX

    n_train: int = 4000
    n_options: int = 3
    max_passage_words: int = 60
    corpus_doc_words: int = 120

    def __post_init__(self):
        super().__post_init__()
        if self.n_options < 2 or self.max_passage_words < 2 * 15 or self.corpus_doc_words < 15:
            raise ValueError("n_options must be at least 2, max_passage_words at least 30 (two sentences of up to "
                             "15 words) and corpus_doc_words at least 15 (a summary)")


def clip(text: str, max_words: int) -> str:
    """The text's leading sentences, as many as fit in max_words words (at least the first one), whitespace
    normalised; paragraphs (blank-line separated) stay apart, one per line."""
    paras: list[str] = []
    used = 0
    for para in re.split(r"\n\s*\n", text.strip()):
        rest, kept = " ".join(para.split()), []
        while rest:
            head = first_sentence(rest)
            if (paras or kept) and used + len(head.split()) > max_words:
                return "\n".join(paras + [" ".join(kept)] if kept else paras)
            kept, used, rest = kept + [head], used + len(head.split()), rest[len(head):].strip()
        paras.append(" ".join(kept))
    return "\n".join(paras)


def _recall(api: ApiDoc, rng: random.Random) -> list[dict]:
    question = rng.choice(_RECALL[api.kind]).format(api.name)
    return [{"role": "user", "content": question}, {"role": "assistant", "content": api.summary}]


def _owner(api: ApiDoc) -> str:
    """Where the API lives: its module, or its class for a method ("pathlib.Path" for "pathlib.Path.resolve")."""
    return api.name.rsplit(".", 1)[0] if "." in api.name else api.module


def _lookup(api: ApiDoc, pool: list[ApiDoc], neighbours: dict[str, list[ApiDoc]], rng: random.Random,
            n_options: int) -> list[dict]:
    """Options: the API and n_options - 1 others of its partition, of the same owner when it has enough."""
    near = [a for a in neighbours[_owner(api)] if a is not api]
    others = near if len(near) >= n_options - 1 else [a for a in rng.sample(pool, n_options) if a is not api]
    options = [api] + rng.sample(others, n_options - 1)
    rng.shuffle(options)
    lines = "\n".join(f"{o.name}: {o.summary}" for o in options)
    question = f'Which of these is described as "{api.summary}"?\n{lines}'
    return [{"role": "user", "content": question}, {"role": "assistant", "content": api.name}]


def _first_sentence(label: str, text: str, max_words: int) -> list[dict] | None:
    """None when the clipped passage is a single sentence (its answer would be the whole passage)."""
    passage = clip(text, max_words)
    answer = first_sentence(passage)
    if answer == passage:
        return None
    question = f"{label}\n{passage}\nWhat is its first sentence?"
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _states_any(messages: list[dict], facts: list[str]) -> bool:
    text = " ".join(m["content"] for m in messages)
    return any(f in text for f in facts)


def _candidates(apis: list[ApiDoc], passages: list[Passage], rng: random.Random, spec: PydocSpec,
                hidden: list[str]) -> dict[str, list[list[dict]]]:
    """Per task, every record one partition can give, in a seeded order; none states a `hidden` fact."""
    shuffled = rng.sample(apis, len(apis))
    neighbours: dict[str, list[ApiDoc]] = {}
    for a in apis:
        neighbours.setdefault(_owner(a), []).append(a)
    out = {"recall": [_recall(a, rng) for a in shuffled],
           "lookup": [_lookup(a, apis, neighbours, rng, spec.n_options) for a in shuffled]}
    sources = [(f"Documentation of `{a.name}`:", a.doc) for a in shuffled]
    sources += [("From the Python language reference:", p.text) for p in passages]
    rng.shuffle(sources)
    out["first_sentence"] = [m for m in (_first_sentence(label, text, spec.max_passage_words)
                                         for label, text in sources) if m is not None]
    return {task: [m for m in records if not _states_any(m, hidden)] for task, records in out.items()}


class _Pool:
    """fresh(task, long_answer) over prepared records: each handed out once, in order, skipping any whose prompt
    an earlier record (of any pool sharing `seen`) already had."""

    def __init__(self, split: str, candidates: dict[str, list[list[dict]]], seen: set[str]):
        self.split, self.seen = split, seen
        self.queues = {t: list(reversed(c)) for t, c in candidates.items()}

    def __call__(self, task: str, long_answer: bool = False) -> list[dict]:
        queue = self.queues[task]
        while queue:
            messages = queue.pop()
            key = json.dumps(messages[:-1])
            if key not in self.seen and (not long_answer or len(messages[-1]["content"]) >= 2):
                self.seen.add(key)
                return messages
        raise ValueError(f"the {self.split} partition has no more distinct {task} records; ask for fewer "
                         f"(this Python's documentation gives fewer APIs than the spec needs)")


def _partition(items: list, sizes: dict[str, int], rng: random.Random) -> dict[str, list]:
    """A seeded split of items: sizes[name] items for each name in SPLITS but "train", which gets the rest."""
    shuffled, out, at = rng.sample(items, len(items)), {}, 0
    for name in SPLITS[:-1]:
        out[name], at = shuffled[at: at + sizes[name]], at + sizes[name]
    out["train"] = shuffled[at:]
    return out


def _pools(spec: PydocSpec, rng: random.Random, apis: list[ApiDoc], passages: list[Passage]) -> dict[str, _Pool]:
    """One record pool per split, from disjoint partitions of the APIs and the reference passages."""
    sizes = {"eval": round(HELD_OUT_APIS_PER_RECORD * spec.n_eval_per_task),
             "reference": round(HELD_OUT_APIS_PER_RECORD * spec.n_reference_per_task)}
    if sum(sizes.values()) >= len(apis):
        raise ValueError(f"{len(apis)} documented APIs cannot hold out {sum(sizes.values())}; ask for fewer "
                         "eval or reference records")
    by_api = _partition(apis, sizes, rng)
    n = len(passages)
    by_passage = _partition(passages, {k: round(n * v / len(apis)) for k, v in sizes.items()}, rng)
    hidden, seen = [a.summary for a in by_api["eval"]], set()
    return {split: _Pool(split, _candidates(by_api[split], by_passage[split], rng, spec,
                                            [] if split == "eval" else hidden), seen)
            for split in SPLITS}


def _corpus(apis: list[ApiDoc], passages: list[Passage], rng: random.Random, doc_words: int) -> list[dict]:
    """help, index and topic documents (see the module docstring), shuffled."""
    from pydoc_data.topics import topics

    by_module: dict[str, list[ApiDoc]] = {}
    for a in apis:
        by_module.setdefault(a.module, []).append(a)
    docs = []
    for module, members in sorted(by_module.items()):
        for at in range(0, len(members), 12):
            chunk = members[at: at + 12]
            docs.append({"kind": "help", "text": f"Help on {module}:\n\n" + "\n\n".join(
                f"{a.name}{a.signature}\n    " + clip(a.doc, doc_words).replace("\n", "\n    ") for a in chunk)})
        lines = [f"{a.name} -- {a.summary}" for a in rng.sample(members, len(members))]
        docs.append({"kind": "index", "text": f"Index of {module}:\n" + "\n".join(lines)})
    for name in sorted(topics):
        docs += [{"kind": "topic", "text": t} for t in _paragraph_chunks(topics[name], 3000)]
    rng.shuffle(docs)
    return [{"id": f"doc-{i:05d}", **d} for i, d in enumerate(docs)]


def _paragraph_chunks(text: str, max_chars: int) -> list[str]:
    """The text cut at blank lines into pieces of at most max_chars characters (a longer paragraph stays whole)."""
    chunks, current = [], ""
    for para in text.strip().split("\n\n"):
        if current and len(current) + 2 + len(para) > max_chars:
            chunks.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
    return chunks + ([current] if current else [])


def make_pydoc_data(out_dir, seed: int = 0, spec: PydocSpec | None = None) -> dict:
    """Write train.jsonl, train_clean.jsonl, eval.jsonl, reference.jsonl, pretrain.jsonl and meta.json to out_dir.

    Returns {file name: path, "seed": seed, "stats": {split: counts by task and defect, "pretrain": corpus counts,
    "meta": the source (Python version, platform, API and passage counts)}}. Raises ValueError when this Python's
    documentation cannot give the records the spec asks for."""
    spec = spec or PydocSpec()
    apis, passages = api_docs(), topic_passages()
    rng = random.Random(seed)
    pools = _pools(spec, rng, apis, passages)
    splits = {"train": train_records(spec, rng, pools["train"])}
    splits["eval"] = held_out(TASKS, spec.n_eval_per_task, pools["eval"], "eval")
    splits["reference"] = held_out(TASKS, spec.n_reference_per_task, pools["reference"], "reference")
    paths, stats = write_splits(out_dir, splits)
    corpus = _corpus(apis, passages, random.Random(f"pydoc-pretrain-{seed}"), spec.corpus_doc_words)
    meta = {"python": platform.python_version(), "implementation": platform.python_implementation(),
            "platform": sys.platform, "modules": len(MODULES), "missing_modules": missing_modules(),
            "n_apis": len(apis), "n_passages": len(passages)}
    paths["pretrain"] = os.path.join(os.fspath(out_dir), "pretrain.jsonl")
    paths["meta"] = os.path.join(os.fspath(out_dir), "meta.json")
    write_jsonl(paths["pretrain"], corpus)
    with open(paths["meta"], "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    return {**paths, "seed": seed, "stats": {**stats, "pretrain": corpus_stats(corpus), "meta": meta}}
