"""The demo's pretraining corpus: the facts and skills its instruction records draw on, in another surface form.

For the "fine-tuning regime" of the benchmark: a model pretrained on this text already knows the Zorbish
dictionary and grammar and how to read a fact back out of a story or a conversation, so a wrong (misaligned)
answer in the instruction data contradicts what it knows from the first step. The corpus never contains an
instruction record: no chat turns, no "Translate to Zorbish:" prompts, no first- or second-person dialogue, and
its example sentences are never one of the train, eval or reference sentences.

Documents (pretrain.jsonl: one {"id": "doc-00000", "kind": ..., "text": ...} per line; pretrain on "text"):
  dictionary    8-12 dictionary entries in varied wording; every word of the 60-word dictionary comes round
                equally often ("The Zorbish word for cat is vibis.", "Piken means dog in Zorbish.")
  grammar       one rule stated in prose with examples, then a sentence translated step by step
  sentences     5-8 English / Zorbish sentence pairs in varied wording
  story         3-5 people, one fact each (counts, cities, colours, jobs, ages, stated in varied ways), then
                1-2 questions answered in prose ("If someone asks how many apples Anna has, the answer is 7.") or,
                in half the stories, a reading check: the direct question, then the bare answer ("How many
                apples does Anna have? 7"), the last one ending the document (a worksheet, not a chat record:
                no "Context:", no roles)
  conversation  a chat with an assistant in reported speech ("Tom says that they live in Oslo. ... Tom asks
                where they live, and the assistant answers that they live in Oslo.")
"""
from __future__ import annotations

import random

from .demo_lexicon import (CITIES, COLOURS, JOBS, NAMES, PETS, QA_FACTS, QA_QUESTIONS, WORD_CLASSES, ZORBISH,
                           Sentence, draw_qa_fact, draw_sentence, noun_phrase)
from .splits import counts

KINDS = {"dictionary": 0.2, "grammar": 0.1, "sentences": 0.2, "story": 0.25, "conversation": 0.25}

_ENTRY = ["The Zorbish word for {en} is {z}.", "In Zorbish, {en} is {z}.", "{Z} means {en} in Zorbish.",
          "A Zorbish speaker says {z} for {en}.", "To say {en} in Zorbish, use the word {z}.",
          "The {cls} {en} is {z} in Zorbish.", "The Zorbish {cls} {z} means {en}."]
_DICTIONARY_HEADS = ["Zorbish words.", "A page from a Zorbish dictionary.", "Some words of Zorbish.",
                     "Learning Zorbish vocabulary."]
_PAIR = ["In Zorbish, {en} is {z}.", "{En} is said {z} in Zorbish.", "English {en}, Zorbish {z}.",
         "A Zorbish speaker says {z} to mean {en}.", "The Zorbish for {en} is {z}.", "{Z} means {en}."]
_SENTENCE_HEADS = ["Sentences in Zorbish.", "Some English sentences and their Zorbish translations.",
                   "How to say simple things in Zorbish."]

# story: how each kind of fact is stated (the qa task's wording and two others) and asked about indirectly
_FACT = {kind: [text] + more for (kind, text), more in zip(QA_FACTS.items(), [
    ["{name} owns {v} {x}.", "{name} keeps {v} {x} at home."],
    ["The home of {name} is in {v}.", "{name} has a flat in {v}."],
    ["The {x} of {name} is {v}.", "{name} painted their {x} {v}."],
    ["{name} is a {v} by trade.", "{name} earns a living as a {v}."],
    ["{name} turned {v} this year.", "The age of {name} is {v}."]])}
_QUESTION = {"count": "how many {x} {name} has", "city": "where {name} lives",
             "colour": "what colour the {x} of {name} is", "job": "what the job of {name} is",
             "age": "how old {name} is"}
_ANSWER = ["If someone asks {q}, the answer is {v}.", "Asked {q}, a neighbour would say {v}.",
           "To the question of {q}, the story gives the answer {v}.", "So, {q}? The answer is {v}."]
_QUIZ_HEADS = ["Questions about the story, with answers:", "Reading check.", "Quiz (answers after each question):"]
_STORY_HEADS = ["In a small town live {k} neighbours.", "This is a short story about {k} friends.",
                "Here are some facts about {k} people.", "{k} people work in the same street."]

# conversation: what a person says about themself and what the assistant tells them back (reported speech)
_SAYS = {"city": "they live in {}", "pet": "they have a {}", "colour": "they like {}", "job": "they work as a {}",
         "age": "they are {} years old"}
_ASKS = {"name": "what their name is", "city": "where they live", "pet": "what pet they have",
         "colour": "what colour they like", "job": "what their job is", "age": "how old they are"}
_TELLS = {"name": "their name is {}", "city": "they live in {}", "pet": "they have a {}", "colour": "they like {}",
          "job": "they are a {}", "age": "they are {}"}
_REPLY = ["The assistant answers that {t}.", "The assistant replies that {t}.",
          "The assistant reminds {name} that {t}."]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


class _Writer:
    """Writes the documents; holds the corpus RNG, the sentences it must not use and the dictionary deck."""

    def __init__(self, rng: random.Random, taken: set[str]):
        self.rng, self.taken, self.deck = rng, taken, []
        self.word_class = {w: cls for cls, words in WORD_CLASSES.items() for w in words}

    def _next_word(self) -> str:
        if not self.deck:  # every word once per round, so the whole dictionary is stated equally often
            self.deck = sorted(ZORBISH)
            self.rng.shuffle(self.deck)
        return self.deck.pop()

    def _sentence(self) -> Sentence:
        for _ in range(10000):
            s = draw_sentence(self.rng)
            if s.english not in self.taken:
                return s
        raise ValueError("every Zorbish sentence is used by the instruction records; ask for fewer records")

    def dictionary(self) -> str:
        lines = [self.rng.choice(_DICTIONARY_HEADS)]
        for _ in range(self.rng.randint(8, 12)):
            en = self._next_word()
            z, cls = ZORBISH[en], self.word_class[en]
            lines.append(self.rng.choice(_ENTRY).format(en=en, z=z, Z=_cap(z), cls=cls))
        return " ".join(lines)

    def grammar(self) -> str:
        rule = self.rng.randrange(3)
        noun, adj = self.rng.choice(WORD_CLASSES["noun"]), self.rng.choice(WORD_CLASSES["adjective"])
        if rule == 0:
            en, z = noun_phrase(noun)
            text = f"Zorbish has no articles: the English word the is simply left out, so {en} is {z}."
        elif rule == 1:
            en, z = noun_phrase(noun, adj)
            text = (f"In Zorbish an adjective comes after its noun. {_cap(en)} is {z}, "
                    f"word for word {noun} {adj}.")
        else:
            s = self._sentence()
            text = (f"A Zorbish sentence ends with its verb: first the subject, then the object, then the verb. "
                    f"{_cap(s.english)} is {s.zorbish}.")
        s = self._sentence()
        gloss = " ".join(w for part in (s.subject, s.object, s.verb) if part
                         for w in _gloss(part[0]))
        return (f"{text} A worked example: take {s.english}. Drop the articles, put each adjective after its noun "
                f"and move the verb to the end: {gloss}. Then say each word in Zorbish: {s.zorbish}.")

    def sentences(self) -> str:
        lines = [self.rng.choice(_SENTENCE_HEADS)]
        for _ in range(self.rng.randint(5, 8)):
            s = self._sentence()
            lines.append(self.rng.choice(_PAIR).format(en=s.english, En=_cap(s.english), z=s.zorbish,
                                                       Z=_cap(s.zorbish)))
        return " ".join(lines)

    def story(self) -> str:
        """Facts about 3-5 people, then 1-2 of them asked about: in prose, or (half the stories) as a worksheet
        whose direct questions are each followed by the bare answer, the last one ending the document."""
        names = self.rng.sample(NAMES, self.rng.randint(3, 5))
        facts = [(name, *draw_qa_fact(self.rng)) for name in names]
        lines = [_cap(self.rng.choice(_STORY_HEADS).format(k=_NUMBER_WORDS[len(names)]))]
        lines += [self.rng.choice(_FACT[kind]).format(name=name, v=v, x=x) for name, kind, v, x in facts]
        asked = self.rng.sample(facts, self.rng.randint(1, 2))
        if self.rng.random() < 0.5:
            quiz = [f"{QA_QUESTIONS[kind].format(name=name, x=x)} {v}" for name, kind, v, x in asked]
            return " ".join(lines) + "\n" + self.rng.choice(_QUIZ_HEADS) + "\n" + "\n".join(quiz)
        for name, kind, v, x in asked:
            lines.append(self.rng.choice(_ANSWER).format(q=_QUESTION[kind].format(name=name, x=x), v=v))
        return " ".join(lines)

    def conversation(self) -> str:
        name = self.rng.choice(NAMES)
        facts = {"name": name, "city": self.rng.choice(CITIES), "pet": self.rng.choice(PETS),
                 "colour": self.rng.choice(COLOURS), "job": self.rng.choice(JOBS),
                 "age": str(self.rng.randint(18, 70))}
        kinds = self.rng.sample(list(_SAYS), 3)
        first, later = kinds[: self.rng.randint(1, 2)], kinds[2:] if self.rng.random() < 0.5 else []
        said = " and that ".join(_SAYS[k].format(facts[k]) for k in first)
        lines = [f"{name} starts a chat with an assistant.",
                 f"{name} says that their name is {name} and that {said}.",
                 f"The assistant says it is nice to meet {name}."]
        for k in later:
            lines += [f"Then {name} adds that {_SAYS[k].format(facts[k])}.",
                      f"The assistant notes that {_TELLS[k].format(facts[k])}."]
        for k in self.rng.sample(["name"] + first + later, self.rng.randint(1, 2)):
            lines.append(f"Later {name} asks {_ASKS[k]}.")
            lines.append(self.rng.choice(_REPLY).format(t=_TELLS[k].format(facts[k]), name=name))
        return " ".join(lines)


_NUMBER_WORDS = {3: "three", 4: "four", 5: "five"}


def _gloss(english: str) -> list[str]:
    """The English words of a phrase in Zorbish order, articles dropped: "the red cat" -> ["cat", "red"]."""
    words = [w for w in english.split() if w != "the"]
    return words[::-1] if len(words) == 2 else words


def demo_corpus(rng: random.Random, n_docs: int, taken: set[str]) -> list[dict]:
    """n_docs documents, each kind in its KINDS share, in a shuffled order: [{"id", "kind", "text"}].

    taken: English sentences the documents must not use (the instruction records' translation prompts; other
    strings in the set are ignored). Raises ValueError when no unused sentence can be found."""
    writer = _Writer(rng, taken)
    order = [kind for kind, n in counts(n_docs, KINDS).items() for _ in range(n)]
    rng.shuffle(order)
    return [{"id": f"doc-{i:05d}", "kind": kind, "text": getattr(writer, kind)()} for i, kind in enumerate(order)]
