"""Unit tests of the pydoc instruction set (stdlib docstrings -> recall / lookup / first_sentence records).

    python -m pytest tests/unit/test_pydoc_data.py -q
"""
import importlib
import json
import platform
import re
from collections import Counter

import pytest

from optbatch_ds.data import load_examples
from optbatch_ds.data.pydoc_demo import TASKS, PydocSpec, clip, make_pydoc_data
from optbatch_ds.data.pydoc_source import MAX_WORDS, api_docs, first_sentence, topic_passages

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def pydoc(tmp_path_factory):
    return make_pydoc_data(tmp_path_factory.mktemp("pydoc"), seed=0)


def read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _subject(record):
    """The API a recall question asks about (the name between backticks)."""
    return re.search(r"`([^`]+)`", record["messages"][0]["content"]).group(1)


def _options(prompt):
    """{name: summary} of a lookup question's options."""
    return dict(line.split(": ", 1) for line in prompt.split("\n")[1:])


def _correct_answer(record):
    """The right final answer, recomputed: from the documentation for recall, from the prompt otherwise."""
    prompt = record["messages"][0]["content"]
    if record["task"] == "recall":
        return _SUMMARIES[_subject(record)]
    if record["task"] == "lookup":
        described = re.match(r'Which of these is described as "(.+)"\?\n', prompt).group(1)
        return next(name for name, summary in _options(prompt).items() if summary == described)
    return first_sentence(_passage(prompt))


def _passage(prompt):
    """The passage of a first_sentence question: the lines between the label and the question."""
    return "\n".join(prompt.split("\n")[1:-1])


def _apis_shown(record):
    """Every API a record names: the recall subject, the lookup options, the documented API of a passage."""
    prompt = record["messages"][0]["content"]
    if record["task"] == "lookup":
        return set(_options(prompt))
    head = prompt.split("\n")[0]
    return {_subject(record)} if "`" in head else set()


_SUMMARIES = {a.name: a.summary for a in api_docs()}


def test_deterministic_for_a_seed(pydoc, tmp_path):
    again = make_pydoc_data(tmp_path / "a", seed=0)
    other = make_pydoc_data(tmp_path / "b", seed=1, spec=PydocSpec(n_train=300, n_eval_per_task=20,
                                                                     n_reference_per_task=20))
    for name in ("train", "train_clean", "eval", "reference", "pretrain", "meta"):
        with open(pydoc[name], "rb") as f, open(again[name], "rb") as g:
            assert f.read() == g.read(), name
    with open(pydoc["train"], "rb") as f, open(other["train"], "rb") as h:
        assert f.read() != h.read()
    meta = pydoc["stats"]["meta"]
    assert meta["python"] == platform.python_version() and meta["n_apis"] > 1500
    with open(pydoc["meta"]) as f:
        assert json.load(f) == meta


def test_defect_rates_and_task_mix(pydoc):
    train = read(pydoc["train"])
    n = len(train)
    assert n == 4000 and Counter(r["task"] for r in train) == {"recall": 1600, "lookup": 1400, "first_sentence": 1000}
    defects = Counter(r["defect"] for r in train)
    assert defects == {"none": 2800, "duplicate": 480, "misaligned": 480, "truncated": 240}
    assert all(set(c) == set(defects) for c in pydoc["stats"]["train"]["by_task_defect"].values())
    clean = [r for r in train if r["defect"] == "none"]
    clean_msgs = {json.dumps(r["messages"]): r["task"] for r in clean}
    assert len(clean_msgs) == len(clean)
    assert all(clean_msgs[json.dumps(r["messages"])] == r["task"] for r in train if r["defect"] == "duplicate")
    for r in train:
        right, answer = _correct_answer(r), r["messages"][-1]["content"]
        if r["defect"] == "misaligned":
            assert answer != right
        elif r["defect"] == "truncated":
            assert right.startswith(answer) and len(answer) < len(right)
        else:
            assert answer == right
    assert read(pydoc["train_clean"]) == clean


def test_clean_answers_are_short_and_extractive_ones_follow_from_the_prompt(pydoc):
    records = [r for split in ("train", "eval", "reference") for r in read(pydoc[split]) if r["defect"] == "none"]
    for r in records:
        prompt, answer = r["messages"][0]["content"], r["messages"][-1]["content"]
        assert 1 <= len(answer.split()) <= MAX_WORDS and len(prompt) < 1200 and answer == _correct_answer(r), r
        if r["task"] == "lookup":
            options = _options(prompt)
            assert len(options) == 3 and len(set(options.values())) == 3 and answer in options
        elif r["task"] == "first_sentence":
            passage = _passage(prompt)
            assert passage.startswith(answer) and passage != answer and len(passage.split()) <= 60


def test_splits_are_disjoint_in_prompts_and_apis(pydoc):
    splits = {s: read(pydoc[s]) for s in ("train", "eval", "reference")}
    prompts = {s: {json.dumps(r["messages"][:-1]) for r in recs} for s, recs in splits.items()}
    assert not prompts["train"] & prompts["eval"] and not prompts["train"] & prompts["reference"]
    assert not prompts["eval"] & prompts["reference"]
    shown = {s: set().union(*(_apis_shown(r) for r in recs)) for s, recs in splits.items()}
    assert len(shown["eval"]) > 200 and len(shown["train"]) > 1500
    assert not shown["train"] & shown["eval"] and not shown["train"] & shown["reference"]
    assert not shown["eval"] & shown["reference"]
    assert Counter(r["task"] for r in splits["eval"]) == {t: 100 for t in TASKS}
    assert Counter(r["task"] for r in splits["reference"]) == {t: 100 for t in TASKS}
    assert all(r["defect"] == "none" for s in ("eval", "reference") for r in splits[s])


def test_eval_recall_facts_are_in_the_corpus_and_in_no_train_record(pydoc):
    corpus = "\n".join(d["text"] for d in read(pydoc["pretrain"]))
    train_text = "\n".join(m["content"] for r in read(pydoc["train"]) for m in r["messages"])
    recall = [r for r in read(pydoc["eval"]) if r["task"] == "recall"]
    assert len(recall) == 100
    for r in recall:
        fact, name = r["messages"][-1]["content"], _subject(r)
        assert re.search(re.escape(name) + r"(\(.*\))?\n    " + re.escape(fact), corpus), name  # in help() form
        assert fact not in train_text, name
        assert r["messages"][0]["content"] not in corpus  # the question itself never is
    kinds = pydoc["stats"]["pretrain"]["by_kind"]
    assert set(kinds) == {"help", "index", "topic"} and kinds["topic"] > 50


def test_records_parse_with_load_examples(pydoc):
    train = load_examples(pydoc["train"])
    assert len(train) == 4000 and {e.task for e in train} == set(TASKS)
    assert {e.meta["defect"] for e in train} == {"none", "duplicate", "misaligned", "truncated"}
    assert len(load_examples(pydoc["eval"])) == 300 and len(load_examples(pydoc["reference"])) == 300


def test_source_reading_and_clipping():
    apis = api_docs()
    names = [a.name for a in apis]
    assert names == sorted(names) and len(set(names)) == len(names)
    assert len({a.summary.lower() for a in apis}) == len(apis)
    by_name = {a.name: a for a in apis}
    assert by_name["len"].summary == "Return the number of items in a container."
    assert all(a.summary.endswith((".", "!", "?")) and a.doc.startswith(a.summary) for a in apis)
    assert all("0x" not in a.signature for a in apis)
    assert len(topic_passages()) > 100
    assert first_sentence("Use e.g. this one. Then more.") == "Use e.g. this one."
    assert clip("One two three. Four five six. Seven eight nine.", 7) == "One two three. Four five six."
    assert clip("One two three four. Five.", 2) == "One two three four."
    assert clip("First one.\n\nsecond  paragraph here.\n\nThird.", 5) == "First one.\nsecond paragraph here."
    assert first_sentence("First one.\nsecond paragraph here.") == "First one."


def test_source_does_not_depend_on_what_the_process_imported():
    """What a module holds depends on what was imported: torch replaces inspect.getfile, transformers patches
    methods into logging.Logger, importing concurrent.futures.thread adds ThreadPoolExecutor (whose methods repeat
    Executor's docstrings). The source is read in a fresh interpreter, so none of it shows."""
    for name in ("concurrent.futures.thread", "torch", "transformers"):
        importlib.import_module(name)
    api_docs.cache_clear()
    names = {a.name for a in api_docs()}
    assert {"inspect.getfile", "concurrent.futures.Executor.submit", "logging.Logger.warning"} <= names
    assert not any(n.endswith("warning_once") or n.startswith("concurrent.futures.ThreadPool") for n in names)


def test_spec_is_validated_and_sizes_are_parameters(tmp_path):
    out = make_pydoc_data(tmp_path, seed=3, spec=PydocSpec(n_train=200, n_eval_per_task=10, n_reference_per_task=5,
                                                           task_mix={"recall": 1, "lookup": 1}))
    assert out["stats"]["train"]["by_task"] == {"lookup": 100, "recall": 100}
    assert out["stats"]["eval"]["n"] == 30 and out["stats"]["reference"]["n"] == 15
    with pytest.raises(ValueError, match="task_mix"):
        PydocSpec(task_mix={"qa": 1})
    with pytest.raises(ValueError, match="n_options"):
        PydocSpec(n_options=1)
    with pytest.raises(ValueError, match="ask for fewer"):
        make_pydoc_data(tmp_path / "big", spec=PydocSpec(n_train=40000))
