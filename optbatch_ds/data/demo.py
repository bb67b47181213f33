"""The demo instruction set (DESIGN §5): three toy task families with real-data defects.

    python -c "from optbatch_ds.data.demo import make_demo_data; print(make_demo_data('out/demo')['stats'])"

Tasks (every answer is determined by the prompt, so a tiny model can reach exact match and
what it learns carries over to unseen combinations):
  dialogue     2-3 user/assistant exchanges, a system message sometimes. The user states facts
               ("My name is Tom. I live in Oslo."), the assistant greets/acknowledges by copying
               them, and the last question asks one back ("Where do I live?" -> "You live in Oslo.").
  translation  English -> Zorbish, an invented language: a fixed 60-word dictionary, no articles,
               adjectives after their noun, verb last (SOV).
               "Translate to Zorbish: the red cat sees the dog" -> "vibis nazus duner piken"
  qa           reading comprehension: 3-4 facts about different people, one question; the answer
               is a word or number from the context ("How many apples does Anna have?" -> "7").

Files written to out_dir (messages format, one JSON object per line, with "id", "task", "defect"; see splits.py):
  train.jsonl        n_train records with defects, skewed task mix
  train_clean.jsonl  the train records with defect == "none" (same order)
  eval.jsonl         n_eval_per_task clean records per task; no eval prompt appears in train
  reference.jsonl    n_reference_per_task (300) clean records per task, prompts disjoint from train and eval: to train
                     a small reference model on (RHO-LOSS), never to evaluate on
  pretrain.jsonl     n_pretrain_docs documents {"id", "kind", "text"} that state the dictionary, the grammar and
                     the reading skills in prose, never a record (demo_corpus.py): the pretraining corpus of the
                     fine-tuning regime (optbatch_ds.bench.pretrain)

Defects (train only): "duplicate" (an exact copy of the messages of a clean record of the same
task), "misaligned" (the final answer replaced by the final answer of another record, of any
task), "truncated" (the final answer cut mid-answer: whole words when it has several, else
characters). Everything else is "none". The same seed gives byte-identical files; train, train_clean
and eval are drawn first, so adding the reference split and the corpus left them unchanged.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import ClassVar

from .demo_corpus import demo_corpus
from .demo_lexicon import (CITIES, COLOURS, EN_ADJS, EN_NOUNS, EN_VERBS_I, EN_VERBS_T, JOBS, NAMES, OBJECTS, PETS,
                           QA_FACTS, QA_QUESTIONS, THINGS, ZORBISH, draw_qa_fact, draw_sentence)
from .splits import SplitSpec, corpus_stats, held_out, train_records, write_jsonl, write_splits

# The lexicon stays importable from here (demo.ZORBISH, demo.EN_NOUNS, ...), where it lived before demo_lexicon.py.
__all__ = ["CITIES", "COLOURS", "DEFAULT_TASK_MIX", "DemoSpec", "EN_ADJS", "EN_NOUNS", "EN_VERBS_I", "EN_VERBS_T",
           "JOBS", "NAMES", "OBJECTS", "PETS", "TASKS", "THINGS", "ZORBISH", "make_demo_data"]

TASKS = ("dialogue", "translation", "qa")
DEFAULT_TASK_MIX = {"dialogue": 0.55, "qa": 0.30, "translation": 0.15}

SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a friendly assistant. Keep answers short.",
                  "Answer in one short sentence."]
TRANSLATE_PROMPTS = ["Translate to Zorbish: {}", "Translate into Zorbish: {}", "In Zorbish, say: {}"]


def _translation(rng: random.Random) -> tuple[list[dict], str]:
    """English sentence of 3-6 words -> Zorbish: no articles, adjective after noun, verb last."""
    sentence = draw_sentence(rng)
    prompt = rng.choice(TRANSLATE_PROMPTS).format(sentence.english)
    return ([{"role": "user", "content": prompt}, {"role": "assistant", "content": sentence.zorbish}],
            sentence.english)


# --- dialogue -----------------------------------------------------------------------------
_STATE = {"city": "I live in {}.", "pet": "I have a {}.", "colour": "I like {}.", "job": "I work as a {}.",
          "age": "I am {} years old."}
_ASK = {"name": "What is my name?", "city": "Where do I live?", "pet": "What pet do I have?",
        "colour": "What colour do I like?", "job": "What is my job?", "age": "How old am I?"}
_TELL = {"name": "Your name is {}.", "city": "You live in {}.", "pet": "You have a {}.",
         "colour": "You like {}.", "job": "You are a {}.", "age": "You are {}."}


def _dialogue(rng: random.Random, system_rate: float) -> tuple[list[dict], str]:
    facts = {"name": rng.choice(NAMES), "city": rng.choice(CITIES), "pet": rng.choice(PETS),
             "colour": rng.choice(COLOURS), "job": rng.choice(JOBS), "age": str(rng.randint(18, 70))}
    kinds = rng.sample(["city", "pet", "colour", "job", "age"], 3)
    msgs = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < system_rate else []
    three = rng.random() < 0.5
    first = kinds[:1] if three else kinds[: rng.randint(1, 2)]
    stated = ["name"] + first
    intro = " ".join([f"My name is {facts['name']}."] + [_STATE[k].format(facts[k]) for k in first])
    msgs += [{"role": "user", "content": intro},
             {"role": "assistant", "content": f"Nice to meet you, {facts['name']}."}]
    if three:
        k = kinds[1]
        stated.append(k)
        msgs += [{"role": "user", "content": _STATE[k].format(facts[k])},
                 {"role": "assistant", "content": "Noted. " + _TELL[k].format(facts[k])}]
    ask = rng.choice(stated)
    msgs += [{"role": "user", "content": _ASK[ask]},
             {"role": "assistant", "content": _TELL[ask].format(facts[ask])}]
    return msgs, json.dumps(msgs[:-1])


# --- qa -----------------------------------------------------------------------------------
def _qa(rng: random.Random) -> tuple[list[dict], str]:
    names = rng.sample(NAMES, rng.randint(3, 4))
    facts, qas = [], []
    for name in names:
        kind, v, x = draw_qa_fact(rng)
        facts.append(QA_FACTS[kind].format(name=name, v=v, x=x))
        qas.append((QA_QUESTIONS[kind].format(name=name, x=x), v))
    q, a = rng.choice(qas)
    prompt = "Context: " + " ".join(facts) + " Question: " + q
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": a}], prompt


def _generate(task: str, rng: random.Random, system_rate: float) -> tuple[list[dict], str]:
    """(messages, key): the key identifies the prompt, for de-duplication and train/eval separation."""
    if task == "dialogue":
        return _dialogue(rng, system_rate)
    if task == "translation":
        return _translation(rng)
    return _qa(rng)


@dataclass(frozen=True)
class DemoSpec(SplitSpec):
    """Sizes, task mix and defect rates of the demo set (SplitSpec: 3000 train records, 100 eval records per task,
    12% duplicates, 12% misaligned, 6% truncated; here 300 reference records per task), the share of dialogues with
    a system message and the number of documents of the pretraining corpus."""

    tasks: ClassVar[tuple[str, ...]] = TASKS
    default_mix: ClassVar[dict[str, float]] = DEFAULT_TASK_MIX

    # 300 per task: a reference model trained on 100 per task tells a wrong answer from a right one barely better
    # than chance; on 300 per task it separates them well (BENCHMARKS.md, reference models)
    n_reference_per_task: int = 300
    system_rate: float = 0.4
    n_pretrain_docs: int = 4000

    def __post_init__(self):
        super().__post_init__()
        if self.n_pretrain_docs < 1:
            raise ValueError(f"n_pretrain_docs must be at least 1, got {self.n_pretrain_docs}")


class _Fresh:
    """Records whose prompts were never generated before (originals are unique; eval is disjoint from train)."""

    def __init__(self, rng: random.Random, system_rate: float):
        self.rng, self.system_rate, self.seen = rng, system_rate, set()

    def __call__(self, task: str, long_answer: bool = False) -> list[dict]:
        for _ in range(10000):
            msgs, key = _generate(task, self.rng, self.system_rate)
            if key not in self.seen and (not long_answer or len(msgs[-1]["content"]) >= 2):
                self.seen.add(key)
                return msgs
        raise ValueError(f"cannot generate enough distinct {task} records; ask for fewer")


def make_demo_data(out_dir, seed: int = 0, spec: DemoSpec | None = None) -> dict:
    """Write train.jsonl, train_clean.jsonl, eval.jsonl, reference.jsonl and pretrain.jsonl to out_dir.

    spec: sizes, task mix and defect rates (DemoSpec()). Returns {split name: path, "seed": seed, "stats": {split
    name: counts by task and defect, "pretrain": corpus counts}}. The train, train_clean and eval files do not
    depend on the reference or corpus settings (those are drawn after them, the corpus from its own RNG).
    Raises ValueError when the spec asks for more distinct records than the generator can make."""
    spec = spec or DemoSpec()
    rng = random.Random(seed)
    fresh = _Fresh(rng, spec.system_rate)
    splits = {"train": train_records(spec, rng, fresh)}
    splits["eval"] = held_out(TASKS, spec.n_eval_per_task, fresh, "eval")
    splits["reference"] = held_out(TASKS, spec.n_reference_per_task, fresh, "reference")
    paths, split_stats = write_splits(out_dir, splits)
    corpus = demo_corpus(random.Random(f"demo-pretrain-{seed}"), spec.n_pretrain_docs, taken=fresh.seen)
    paths["pretrain"] = os.path.join(os.fspath(out_dir), "pretrain.jsonl")
    write_jsonl(paths["pretrain"], corpus)
    return {**paths, "seed": seed, "stats": {**split_stats, "pretrain": corpus_stats(corpus)}}
