"""The demo's small world: the people, places and things its records talk about, and the Zorbish language.

Shared by the instruction records (demo.py) and the pretraining corpus that states the same facts and skills in
another surface form (demo_corpus.py). Everything here is fixed: nothing depends on the data seed.

Zorbish: an invented language with a 60-word dictionary (ZORBISH, English word -> Zorbish word), no articles,
adjectives after their noun and the verb last (SOV):

    the red cat sees the dog  ->  vibis nazus duner piken        (cat red dog sees)
"""
from __future__ import annotations

import random
from dataclasses import dataclass

NAMES = ["Tom", "Anna", "Ben", "Lena", "Max", "Sara", "Omar", "Mia", "Leo", "Nora", "Ivan", "Eva",
         "Sam", "Lucy", "Paul", "Rosa", "Hugo", "Ida", "Karl", "Maya", "Otto", "Vera", "Jon", "Zoe"]
CITIES = ["Oslo", "Rome", "Paris", "Lima", "Cairo", "Tokyo", "Berlin", "Madrid", "Dublin", "Vienna",
          "Prague", "Delhi", "Seoul", "Quito", "Riga", "Sofia"]
PETS = ["cat", "dog", "fish", "bird", "horse", "rabbit", "turtle", "frog"]
COLOURS = ["red", "blue", "green", "yellow", "black", "white", "pink", "brown"]
JOBS = ["teacher", "doctor", "baker", "pilot", "farmer", "singer", "nurse", "driver"]
OBJECTS = ["apples", "books", "coins", "cups", "pens", "keys", "eggs", "stamps"]
THINGS = ["car", "hat", "bike", "house", "coat", "bag", "door", "kite"]

# The qa task's kinds of fact: how each is stated in a context and asked about ({name}, {v}alue, {x} = the object).
QA_FACTS = {"count": "{name} has {v} {x}.", "city": "{name} lives in {v}.", "colour": "{name} has a {v} {x}.",
            "job": "{name} works as a {v}.", "age": "{name} is {v} years old."}
QA_QUESTIONS = {"count": "How many {x} does {name} have?", "city": "Where does {name} live?",
                "colour": "What colour is the {x} of {name}?", "job": "What is the job of {name}?",
                "age": "How old is {name}?"}



def draw_qa_fact(rng: random.Random) -> tuple[str, str, str]:
    """(kind, value, object) of one random qa fact: ("count", "7", "apples"), ("city", "Oslo", ""), ... The order
    of the draws is part of the demo's byte-for-byte reproducibility: do not reorder them."""
    kind = rng.choice(["count", "city", "colour", "job", "age"])
    if kind == "count":
        return kind, str(rng.randint(2, 19)), rng.choice(OBJECTS)
    if kind == "colour":
        return kind, rng.choice(COLOURS), rng.choice(THINGS)
    if kind in ("city", "job"):
        return kind, rng.choice(CITIES if kind == "city" else JOBS), ""
    return kind, str(rng.randint(5, 90)), ""


EN_NOUNS = ["cat", "dog", "bird", "fish", "horse", "mouse", "wolf", "bear", "frog", "king", "queen",
            "girl", "boy", "child", "man", "woman", "farmer", "baker", "teacher", "doctor", "pilot", "singer"]
EN_ADJS = ["red", "blue", "green", "big", "small", "old", "young", "happy", "sad", "fast", "slow",
           "tall", "brave", "lazy"]
EN_VERBS_I = ["sleeps", "runs", "sings", "jumps", "eats", "swims", "laughs", "cries", "walks", "dances",
              "waits", "hides"]
EN_VERBS_T = ["sees", "likes", "finds", "helps", "follows", "chases", "calls", "feeds", "knows", "hears",
              "meets", "paints"]
WORD_CLASSES = {"noun": EN_NOUNS, "adjective": EN_ADJS, "verb": EN_VERBS_I + EN_VERBS_T}


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


def noun_phrase(noun: str, adjective: str | None = None) -> tuple[str, str]:
    """("the red cat", "vibis nazus"): an English noun phrase and its Zorbish (no article, adjective after)."""
    if adjective is None:
        return f"the {noun}", ZORBISH[noun]
    return f"the {adjective} {noun}", f"{ZORBISH[noun]} {ZORBISH[adjective]}"


@dataclass(frozen=True)
class Sentence:
    """One English sentence of 3-6 words, kept as (English, Zorbish) parts so it can be explained step by step."""

    subject: tuple[str, str]
    verb: tuple[str, str]
    object: tuple[str, str] | None = None

    @property
    def english(self) -> str:
        """Subject, verb, object: "the red cat sees the dog"."""
        return " ".join(p[0] for p in (self.subject, self.verb, self.object) if p is not None)

    @property
    def zorbish(self) -> str:
        """Subject, object, verb (verb last): "vibis nazus piken duner"."""
        return " ".join(p[1] for p in (self.subject, self.object, self.verb) if p is not None)


def draw_sentence(rng: random.Random) -> Sentence:
    """A random sentence: one of six forms (noun/adjective-noun subject, intransitive verb or transitive verb with
    a noun/adjective-noun object), weighted towards the longer ones. The order of the draws is part of the demo's
    byte-for-byte reproducibility: do not reorder them."""
    form = rng.choices(["NV", "ANV", "NVN", "ANVN", "NVAN", "ANVAN"], weights=[1, 2, 3, 3, 3, 2])[0]
    n1, n2 = rng.sample(EN_NOUNS, 2)
    a1, a2 = rng.choice(EN_ADJS), rng.choice(EN_ADJS)
    subject = noun_phrase(n1, a1 if form.startswith("A") else None)
    if form.endswith("NV"):
        verb = rng.choice(EN_VERBS_I)
        return Sentence(subject, (verb, ZORBISH[verb]))
    verb = rng.choice(EN_VERBS_T)
    return Sentence(subject, (verb, ZORBISH[verb]), noun_phrase(n2, a2 if form.endswith("AN") else None))
