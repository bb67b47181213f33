"""Unit tests of the demo instruction set (DESIGN §5).

    python -m pytest tests/unit/test_demo_data.py -q
"""
import json
import re
from collections import Counter

import pytest

from optbatch_ds.data import load_examples, make_demo_data
from optbatch_ds.data.demo import EN_ADJS, EN_NOUNS, ZORBISH, DemoSpec

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_data(tmp_path_factory.mktemp("demo"), seed=0)


def read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_deterministic_for_a_seed(demo, tmp_path):
    again = make_demo_data(tmp_path / "a", seed=0)
    other = make_demo_data(tmp_path / "b", seed=1)
    for name in ("train", "eval", "train_clean", "reference", "pretrain"):
        with open(demo[name], "rb") as f, open(again[name], "rb") as g, open(other[name], "rb") as h:
            mine = f.read()
            assert mine == g.read() and mine != h.read()
    assert again["stats"] == demo["stats"]


def test_defect_rates_and_task_mix(demo):
    train = read(demo["train"])
    n = len(train)
    assert n == 3000
    defects = Counter(r["defect"] for r in train)
    assert defects["duplicate"] >= 0.10 * n and defects["misaligned"] >= 0.10 * n and defects["truncated"] > 0
    assert set(defects) == {"none", "duplicate", "misaligned", "truncated"}
    tasks = Counter(r["task"] for r in train)
    assert tasks == {"dialogue": 1650, "qa": 900, "translation": 450}
    stats = demo["stats"]["train"]
    assert stats["by_defect"] == dict(sorted(defects.items())) and stats["by_task"] == dict(sorted(tasks.items()))
    # Duplicates are exact copies of a clean record of the same task; clean prompts are unique.
    clean = [r for r in train if r["defect"] == "none"]
    clean_msgs = {json.dumps(r["messages"]): r["task"] for r in clean}
    assert len(clean_msgs) == len(clean)
    for r in train:
        if r["defect"] == "duplicate":
            assert clean_msgs[json.dumps(r["messages"])] == r["task"]
    assert read(demo["train_clean"]) == clean
    # Every task carries every defect.
    assert all(set(c) == set(defects) for c in stats["by_task_defect"].values())


def _zorbish_of(english):
    """The Zorbish translation of an English demo sentence, recomputed from the dictionary and the grammar."""
    words = [w for w in english.split() if w != "the"]
    out, i = [], 0
    groups = []
    while i < len(words):  # [adj] noun groups and the verb
        if words[i] in EN_ADJS:
            groups.append([ZORBISH[words[i + 1]], ZORBISH[words[i]]])
            i += 2
        elif words[i] in EN_NOUNS:
            groups.append([ZORBISH[words[i]]])
            i += 1
        else:
            verb = ZORBISH[words[i]]
            i += 1
    for g in groups:
        out += g
    return " ".join(out + [verb])


def _correct_answer(record):
    """The answer the prompt determines (recomputed from the text)."""
    msgs = record["messages"]
    user = " ".join(m["content"] for m in msgs if m["role"] == "user")
    ans = msgs[-1]["content"]
    if record["task"] == "translation":
        return _zorbish_of(msgs[-1 - 1]["content"].split(": ", 1)[1])
    return ans if re.sub(r"[.?]", "", ans).split()[-1] in user else None


def test_clean_answers_follow_from_prompt_and_defects_break_them(demo):
    train = read(demo["train"])
    for r in train:
        ok = _correct_answer(r) == r["messages"][-1]["content"]
        if r["defect"] in ("none", "duplicate"):
            assert ok, r
        elif r["defect"] == "truncated":
            assert not ok or r["task"] != "translation", r
    for r in train:
        if r["defect"] == "misaligned" and r["task"] == "translation":
            assert _correct_answer(r) != r["messages"][-1]["content"]


def test_eval_is_clean_disjoint_and_short(demo):
    ev = read(demo["eval"])
    assert Counter(r["task"] for r in ev) == {"dialogue": 100, "qa": 100, "translation": 100}
    assert all(r["defect"] == "none" for r in ev)
    assert all(_correct_answer(r) == r["messages"][-1]["content"] for r in ev)
    train_prompts = {json.dumps(r["messages"][:-1]) for r in read(demo["train"])}
    assert not any(json.dumps(r["messages"][:-1]) in train_prompts for r in ev)
    train_sentences = {r["messages"][0]["content"].split(": ", 1)[1] for r in read(demo["train"])
                       if r["task"] == "translation"}
    assert not any(r["messages"][0]["content"].split(": ", 1)[1] in train_sentences
                   for r in ev if r["task"] == "translation")
    assert all(1 <= len(r["messages"][-1]["content"].split()) <= 8 for r in ev)


def test_records_parse_with_load_examples(demo):
    train = load_examples(demo["train"])
    assert len(train) == 3000 and {e.task for e in train} == {"dialogue", "qa", "translation"}
    assert {e.meta["defect"] for e in train} == {"none", "duplicate", "misaligned", "truncated"}
    dialogue = [e for e in train if e.task == "dialogue"]
    assert any(e.messages[0]["role"] == "system" for e in dialogue)
    assert {sum(m["role"] == "assistant" for m in e.messages) for e in dialogue} == {2, 3}
    assert len(load_examples(demo["eval"])) == 300 and len(load_examples(demo["train_clean"])) == 2100


def test_sizes_rates_and_mix_are_parameters(tmp_path):
    out = make_demo_data(tmp_path, seed=5, spec=DemoSpec(n_train=200, n_eval_per_task=10,
                                                         task_mix={"qa": 1, "translation": 1}, duplicate_rate=0.2,
                                                         misaligned_rate=0.0, truncated_rate=0.1))
    s = out["stats"]
    assert s["train"]["by_task"] == {"qa": 100, "translation": 100}
    assert s["train"]["by_defect"] == {"duplicate": 40, "none": 140, "truncated": 20}
    assert s["eval"]["by_task"] == {"dialogue": 10, "qa": 10, "translation": 10}
    with pytest.raises(ValueError, match="task_mix"):
        DemoSpec(task_mix={"chat": 1})
    with pytest.raises(ValueError, match="defect rates"):
        DemoSpec(duplicate_rate=0.5, misaligned_rate=0.5)
    with pytest.raises(ValueError, match="n_pretrain_docs"):
        DemoSpec(n_pretrain_docs=0)


def _translation_sentence(record):
    return record["messages"][0]["content"].split(": ", 1)[1]


def test_reference_split_is_clean_and_disjoint_from_train_and_eval(demo):
    ref = read(demo["reference"])
    assert [r["id"] for r in ref] == [f"reference-{i:05d}" for i in range(900)]
    assert Counter(r["task"] for r in ref) == {"dialogue": 300, "qa": 300, "translation": 300}
    assert all(r["defect"] == "none" and _correct_answer(r) == r["messages"][-1]["content"] for r in ref)
    assert demo["stats"]["reference"]["by_task"] == {"dialogue": 300, "qa": 300, "translation": 300}
    prompts = {json.dumps(r["messages"][:-1]) for r in ref}
    assert len(prompts) == len(ref)
    for split in ("train", "eval"):
        others = read(demo[split])
        assert not prompts & {json.dumps(r["messages"][:-1]) for r in others}, split
        sentences = {_translation_sentence(r) for r in others if r["task"] == "translation"}
        assert not any(_translation_sentence(r) in sentences for r in ref if r["task"] == "translation"), split
    assert len(load_examples(demo["reference"])) == 900


def _corpus(demo):
    return read(demo["pretrain"])


def test_corpus_never_contains_an_instruction_record(demo):
    text = "\n".join(d["text"] for d in _corpus(demo))
    assert "<|" not in text and "Translate" not in text and "Context:" not in text
    records = read(demo["train"]) + read(demo["eval"]) + read(demo["reference"])
    # Every turn of two words or more; not the cut answers of truncated records (a Zorbish noun phrase can be one).
    contents = {m["content"] for r in records for m in r["messages"][: -1 if r["defect"] == "truncated" else None]
                if len(m["content"].split()) >= 2}
    assert len(contents) > 3000 and not [c for c in contents if c in text][:5]
    sentences = {_translation_sentence(r) for r in records if r["task"] == "translation"}
    assert len(sentences) > 500 and not [s for s in sentences if s in text][:5]


def test_corpus_states_the_dictionary_and_grammar_correctly(demo):
    docs = _corpus(demo)
    text = "\n".join(d["text"] for d in docs)
    words = set(re.findall(r"[A-Za-z]+", text.lower()))
    assert set(ZORBISH) <= words and set(ZORBISH.values()) <= words  # every word of the dictionary, both sides
    entries = re.findall(r"The Zorbish word for (\w+) is (\w+)\.", text)
    assert len(entries) > 50 and all(ZORBISH[en] == z for en, z in entries)
    pairs = re.findall(r"In Zorbish, (the [a-z ]+?) is ([a-z ]+)\.", text)
    sentences = [(en, z) for en, z in pairs if len(en.split()) >= 3]
    assert len(sentences) > 50 and all(_zorbish_of(en) == z for en, z in sentences)
    stats = demo["stats"]["pretrain"]
    assert stats["n_docs"] == len(docs) == 4000
    assert stats["by_kind"] == {"conversation": 1000, "dictionary": 800, "grammar": 400, "sentences": 800,
                                "story": 1000}
    assert all(d["text"].strip() and d["id"] == f"doc-{i:05d}" for i, d in enumerate(docs))


_STORY_ANSWER = re.compile(r"(?:the answer is|would say|gives the answer|The answer is) (\w+)\.")
_ASSISTANT_REPLY = re.compile(r"The assistant (?:answers|replies|reminds \w+) that (.+?)\.")
_QUIZ_ANSWER = re.compile(r"\? (\w+)(?=\n|$)")


def test_corpus_answers_with_the_facts_it_states(demo):
    """Stories and conversations answer each question with a fact stated before it (the skill the records need)."""
    n = 0
    for doc in _corpus(demo):
        patterns = {"story": (_STORY_ANSWER, _QUIZ_ANSWER), "conversation": (_ASSISTANT_REPLY,)}
        for m in (m for p in patterns.get(doc["kind"], ()) for m in p.finditer(doc["text"])):
            value = m.group(1).split()[-1]
            assert re.search(rf"\b{value}\b", doc["text"][: m.start()]), doc
            n += 1
    assert n > 2000 and sum("\n" in d["text"] for d in _corpus(demo) if d["kind"] == "story") > 300


def test_the_cached_demo_gains_a_split_an_older_cache_lacks(demo, tmp_path):
    """train.py and launch/reference.py share the cached demo (ensure_demo_data): a cache made before the reference
    split existed gets it, the same bytes as a fresh one, and its other files stay as they were."""
    import os

    from optbatch_ds.session import ensure_demo_data

    target = tmp_path / "demo_data"
    paths = ensure_demo_data(str(target))
    assert set(paths) == {"train", "eval", "reference"} and all(os.path.exists(p) for p in paths.values())
    os.remove(paths["reference"])
    stamp = os.stat(paths["train"]).st_mtime_ns
    assert ensure_demo_data(str(target)) == paths
    with open(paths["reference"], "rb") as f, open(demo["reference"], "rb") as g:
        assert f.read() == g.read()
    assert os.stat(paths["train"]).st_mtime_ns == stamp
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".demo_")]  # no temporary folder left
