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

Files written to out_dir (messages format, one JSON object per line, with "id", "task", "defect"):
  train.jsonl        n_train records with defects, skewed task mix
  train_clean.jsonl  the train records with defect == "none" (same order)
  eval.jsonl         n_eval_per_task clean records per task; no eval prompt appears in train

Defects (train only): "duplicate" (an exact copy of the messages of a clean record of the same
task), "misaligned" (the final answer replaced by the final answer of another record, of any
task), "truncated" (the final answer cut mid-answer: whole words when it has several, else
characters). Everything else is "none". The same seed gives byte-identical files.
"""
from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import dataclass

TASKS = ("dialogue", "translation", "qa")
DEFAULT_TASK_MIX = {"dialogue": 0.55, "qa": 0.30, "translation": 0.15}

NAMES = ["Tom", "Anna", "Ben", "Lena", "Max", "Sara", "Omar", "Mia", "Leo", "Nora", "Ivan", "Eva",
         "Sam", "Lucy", "Paul", "Rosa", "Hugo", "Ida", "Karl", "Maya", "Otto", "Vera", "Jon", "Zoe"]
CITIES = ["Oslo", "Rome", "Paris", "Lima", "Cairo", "Tokyo", "Berlin", "Madrid", "Dublin", "Vienna",
          "Prague", "Delhi", "Seoul", "Quito", "Riga", "Sofia"]
PETS = ["cat", "dog", "fish", "bird", "horse", "rabbit", "turtle", "frog"]
COLOURS = ["red", "blue", "green", "yellow", "black", "white", "pink", "brown"]
JOBS = ["teacher", "doctor", "baker", "pilot", "farmer", "singer", "nurse", "driver"]
OBJECTS = ["apples", "books", "coins", "cups", "pens", "keys", "eggs", "stamps"]
THINGS = ["car", "hat", "bike", "house", "coat", "bag", "door", "kite"]
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a friendly assistant. Keep answers short.",
                  "Answer in one short sentence."]

# --- translation: the Zorbish dictionary (fixed, independent of the seed) -------------------
EN_NOUNS = ["cat", "dog", "bird", "fish", "horse", "mouse", "wolf", "bear", "frog", "king", "queen",
            "girl", "boy", "child", "man", "woman", "farmer", "baker", "teacher", "doctor", "pilot", "singer"]
EN_ADJS = ["red", "blue", "green", "big", "small", "old", "young", "happy", "sad", "fast", "slow",
           "tall", "brave", "lazy"]
EN_VERBS_I = ["sleeps", "runs", "sings", "jumps", "eats", "swims", "laughs", "cries", "walks", "dances",
              "waits", "hides"]
EN_VERBS_T = ["sees", "likes", "finds", "helps", "follows", "chases", "calls", "feeds", "knows", "hears",
              "meets", "paints"]


def _zorbish_dictionary() -> dict[str, str]:
    rng = random.Random(20240531)  # fixed: the language never changes with the data seed
    cons, vows = "bdfgklmnprstvz", "aeiou"
    words = EN_NOUNS + EN_ADJS + EN_VERBS_I + EN_VERBS_T
    out, used = {}, set()
    for w in words:
        while True:
            z = "".join(rng.choice(cons) + rng.choice(vows) for _ in range(2)) + rng.choice(["", "n", "s", "r"])
            if z not in used and z not in words:
                used.add(z)
                out[w] = z
                break
    return out


ZORBISH = _zorbish_dictionary()
TRANSLATE_PROMPTS = ["Translate to Zorbish: {}", "Translate into Zorbish: {}", "In Zorbish, say: {}"]


def _translation(rng: random.Random) -> tuple[list[dict], str]:
    """English sentence of 3-6 words -> Zorbish: no articles, adjective after noun, verb last."""
    z = ZORBISH
    form = rng.choices(["NV", "ANV", "NVN", "ANVN", "NVAN", "ANVAN"], weights=[1, 2, 3, 3, 3, 2])[0]
    n1, n2 = rng.sample(EN_NOUNS, 2)
    a1, a2 = rng.choice(EN_ADJS), rng.choice(EN_ADJS)
    subj_en = f"the {a1} {n1}" if form.startswith("A") else f"the {n1}"
    subj_z = [z[n1], z[a1]] if form.startswith("A") else [z[n1]]
    if form.endswith("NV"):
        v = rng.choice(EN_VERBS_I)
        en, zb = f"{subj_en} {v}", subj_z + [z[v]]
    else:
        v = rng.choice(EN_VERBS_T)
        obj_en = f"the {a2} {n2}" if form.endswith("AN") else f"the {n2}"
        obj_z = [z[n2], z[a2]] if form.endswith("AN") else [z[n2]]
        en, zb = f"{subj_en} {v} {obj_en}", subj_z + obj_z + [z[v]]
    prompt = rng.choice(TRANSLATE_PROMPTS).format(en)
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": " ".join(zb)}], en


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
        kind = rng.choice(["count", "city", "colour", "job", "age"])
        if kind == "count":
            n, obj = str(rng.randint(2, 19)), rng.choice(OBJECTS)
            facts.append(f"{name} has {n} {obj}.")
            qas.append((f"How many {obj} does {name} have?", n))
        elif kind == "city":
            c = rng.choice(CITIES)
            facts.append(f"{name} lives in {c}.")
            qas.append((f"Where does {name} live?", c))
        elif kind == "colour":
            c, t = rng.choice(COLOURS), rng.choice(THINGS)
            facts.append(f"{name} has a {c} {t}.")
            qas.append((f"What colour is the {t} of {name}?", c))
        elif kind == "job":
            j = rng.choice(JOBS)
            facts.append(f"{name} works as a {j}.")
            qas.append((f"What is the job of {name}?", j))
        else:
            a = str(rng.randint(5, 90))
            facts.append(f"{name} is {a} years old.")
            qas.append((f"How old is {name}?", a))
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


def _truncate(answer: str, rng: random.Random) -> str:
    words = answer.split(" ")
    if len(words) >= 2:
        return " ".join(words[: rng.randint(1, len(words) - 1)])
    return answer[: rng.randint(1, len(answer) - 1)]


def _counts(total: int, shares: dict[str, float]) -> dict[str, int]:
    """Integer counts summing to `total`, proportional to shares (largest remainder)."""
    raw = {k: total * v for k, v in shares.items()}
    out = {k: int(r) for k, r in raw.items()}
    for k in sorted(raw, key=lambda k: (out[k] - raw[k], k))[: total - sum(out.values())]:
        out[k] += 1
    return out


@dataclass(frozen=True)
class DemoSpec:
    """Sizes, task mix and defect rates of the demo set. Rates are fractions of each task's train records;
    task_mix gives each task's share of the train records (normalised; None = DEFAULT_TASK_MIX)."""

    n_train: int = 3000
    n_eval_per_task: int = 100
    task_mix: dict | None = None
    duplicate_rate: float = 0.12
    misaligned_rate: float = 0.12
    truncated_rate: float = 0.06
    system_rate: float = 0.4

    def __post_init__(self):
        mix = self.mix
        unknown = set(mix) - set(TASKS)
        if unknown or not mix or any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
            raise ValueError(f"task_mix must give non-negative shares for tasks among {TASKS}, got {mix}")
        rates = (self.duplicate_rate, self.misaligned_rate, self.truncated_rate)
        if min(rates) < 0 or sum(rates) >= 1:
            raise ValueError("defect rates must be non-negative and sum to less than 1")

    @property
    def mix(self) -> dict[str, float]:
        return dict(DEFAULT_TASK_MIX if self.task_mix is None else self.task_mix)


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


def _train_records(spec: DemoSpec, rng: random.Random, fresh: _Fresh) -> list[dict]:
    """The train records: per task, clean ones and each defect at its rate, shuffled and numbered."""
    mix = spec.mix
    total = sum(mix.values())
    per_task = _counts(spec.n_train, {t: mix.get(t, 0) / total for t in TASKS})
    train: list[dict] = []
    for task in TASKS:
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
    answers = [r["messages"][-1]["content"] for r in train]
    for r in train:
        last = r["messages"][-1]
        if r["defect"] == "truncated":
            last["content"] = _truncate(last["content"], rng)
        elif r["defect"] == "misaligned":
            correct = last["content"]
            while last["content"] == correct:
                last["content"] = rng.choice(answers)
    rng.shuffle(train)
    return [{"id": f"train-{i:05d}", **r} for i, r in enumerate(train)]


def _stats(records: list[dict]) -> dict:
    by_td: dict[str, Counter] = {}
    for r in records:
        by_td.setdefault(r["task"], Counter())[r["defect"]] += 1
    return {"n": len(records), "by_task": dict(sorted(Counter(r["task"] for r in records).items())),
            "by_defect": dict(sorted(Counter(r["defect"] for r in records).items())),
            "by_task_defect": {t: dict(sorted(c.items())) for t, c in sorted(by_td.items())}}


def make_demo_data(out_dir, seed: int = 0, spec: DemoSpec | None = None) -> dict:
    """Write train.jsonl, train_clean.jsonl and eval.jsonl to out_dir; returns paths and stats.

    spec: sizes, task mix and defect rates (DemoSpec(); 3000 train records, 100 eval records per task)."""
    spec = spec or DemoSpec()
    rng = random.Random(seed)
    fresh = _Fresh(rng, spec.system_rate)
    train = _train_records(spec, rng, fresh)
    eval_records = [{"task": task, "defect": "none", "messages": fresh(task)}
                    for task in TASKS for _ in range(spec.n_eval_per_task)]
    eval_records = [{"id": f"eval-{i:05d}", **r} for i, r in enumerate(eval_records)]
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, f"{name}.jsonl") for name in ("train", "train_clean", "eval")}
    clean_train = [r for r in train if r["defect"] == "none"]
    for name, records in (("train", train), ("train_clean", clean_train), ("eval", eval_records)):
        with open(paths[name], "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return {**paths, "seed": seed,
            "stats": {"train": _stats(train), "train_clean": _stats(clean_train), "eval": _stats(eval_records)}}
