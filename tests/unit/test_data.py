"""Unit tests of optbatch_ds.data: formats, validation, chat template + loss mask, sampler.

    python -m pytest tests/unit/test_data.py -q
"""
import json
import os

import pytest

from optbatch_ds.data import (BUILTIN_CHAT_TEMPLATE, IGNORE_INDEX, ChatTemplateError, DataError, EpochSampler,
                              Example, SkipReport, chat_template_of, encode_example, encode_examples, encode_prompt,
                              load_examples, split_for_generation, train_sentencepiece_tokenizer)
from tests.chat_families import supervised_runs

pytestmark = pytest.mark.unit

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

MULTI = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "My name is Tom. I live in Oslo."},
    {"role": "assistant", "content": "Nice to meet you, Tom."},
    {"role": "user", "content": "I have a cat."},
    {"role": "assistant", "content": "Noted. You have a cat."},
    {"role": "user", "content": "Where do I live?"},
    {"role": "assistant", "content": "You live in Oslo."},
]


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def alpaca(i=0, **kw):
    return {"instruction": f"Say {i}", "output": f"{i}", **kw}


# ------------------------------------------------------------------ tokenizers (built once)

@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    words = ("my name is Tom Anna I live in Oslo Rome you have a cat dog nice to meet noted where do what "
             "the red blue sleeps runs say translate helpful assistant are").split()
    texts = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(9)) + f" {i}." for i in range(300)]
    out = tmp_path_factory.mktemp("tok")
    return train_sentencepiece_tokenizer(texts, out, vocab_size=400)


@pytest.fixture(scope="module")
def chatml_tok(tok, tmp_path_factory):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tok.name_or_path, local_files_only=True)
    t.add_special_tokens({"extra_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    t.chat_template = CHATML
    return t


# ------------------------------------------------------------------ formats

def test_alpaca_with_and_without_input_and_system(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Add.", "input": "2 and 3", "output": "5", "system": "Be brief.", "task": "math", "id": 7},
        {"instruction": "Hi", "input": "", "output": "Hello"},
        {"instruction": "Hi", "output": "Hello", "input": None},
    ])
    ex = load_examples(p)
    assert ex[0].messages == [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "Add.\n\n2 and 3"},
                              {"role": "assistant", "content": "5"}]
    assert ex[0].task == "math" and ex[0].meta == {"id": 7} and ex[0].source == f"{p}:1"
    assert ex[1].messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert ex[1].task == "default" and ex[2].messages == ex[1].messages and ex[2].source == f"{p}:3"


def test_sharegpt_multi_turn_and_aliases(tmp_path):
    conv = [{"from": "system", "value": "S"}, {"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
            {"from": "User", "value": "q2"}, {"from": "chatgpt", "value": "a2"}, {"from": "user", "value": "q3"},
            {"from": "model", "value": "a3"}]
    p = write_jsonl(tmp_path / "s.jsonl", [{"conversations": conv},
                                           {"conversations": conv[1:3], "system": "T", "lang": "en"}])
    ex = load_examples(p)
    assert [m["role"] for m in ex[0].messages] == ["system"] + ["user", "assistant"] * 3
    assert [m["content"] for m in ex[0].messages] == ["S", "q1", "a1", "q2", "a2", "q3", "a3"]
    assert ex[1].messages[0] == {"role": "system", "content": "T"} and ex[1].meta == {"lang": "en"}


def test_messages_many_turns(tmp_path):
    many = [{"role": "user", "content": f"u{i}"} if i % 2 == 0 else {"role": "assistant", "content": f"a{i}"}
            for i in range(12)]
    p = write_jsonl(tmp_path / "m.jsonl", [{"messages": MULTI, "task": "dialogue"}, {"messages": many}])
    ex = load_examples(p)
    assert ex[0].messages == MULTI and ex[0].task == "dialogue" and ex[1].messages == many


def test_detection_per_file_in_folder_and_override(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(d / "b.jsonl", [{"messages": MULTI}])
    write_jsonl(d / "a.jsonl", [alpaca(1), alpaca(2)])
    (d / "c.json").write_text(json.dumps([{"conversations": [{"from": "human", "value": "x"},
                                                             {"from": "gpt", "value": "y"}]}]))
    (d / "notes.txt").write_text("ignored")
    ex = load_examples(str(d))
    assert [e.source.split(os.sep)[-1] for e in ex] == ["a.jsonl:1", "a.jsonl:2", "b.jsonl:1", "c.json:1"]
    assert ex[3].messages[1]["content"] == "y"
    p = write_jsonl(tmp_path / "a.jsonl", [alpaca(1)])
    assert load_examples(p, fmt="alpaca")[0].messages[-1]["content"] == "1"
    with pytest.raises(DataError, match="field 'conversations'"):
        load_examples(p, fmt="sharegpt")
    with pytest.raises(ValueError, match="did you mean 'alpaca'"):
        load_examples(p, fmt="alpacca")


def test_unknown_format_lists_keys_formats_and_flag(tmp_path):
    p = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(DataError) as e:
        load_examples(p)
    msg = str(e.value)
    for s in ("u.jsonl:1", "unknown format", "'completion'", "'prompt'", "alpaca", "sharegpt", "messages",
              "--data-format"):
        assert s in msg
    p = write_jsonl(tmp_path / "t.jsonl", [{"instrution": "a", "output": "b"}])
    with pytest.raises(DataError, match="did you mean 'instruction'"):
        load_examples(p, on_bad_record="skip")


def test_json_array_parquet_and_sources(tmp_path):
    import datasets

    recs = [{"messages": MULTI, "task": "dialogue"}, {"messages": MULTI[1:3], "task": None}]
    j = tmp_path / "x.json"
    j.write_text("[\n" + ",\n".join(json.dumps(r, indent=1) for r in recs) + "\n]\n")
    ex = load_examples(str(j))
    assert [e.task for e in ex] == ["dialogue", "default"]
    text = j.read_text()
    line = text[:text.index(json.dumps(recs[1], indent=1))].count("\n") + 1   # where record 2 starts
    assert line > 3 and ex[0].source == f"{j}:2" and ex[1].source == f"{j}:{line}"
    pq = str(tmp_path / "x.parquet")
    datasets.Dataset.from_list(recs).to_parquet(pq)
    ex = load_examples(pq)
    assert ex[0].messages == MULTI and ex[1].task == "default" and ex[1].source == f"{pq}:record 2"


def test_offline_dataset_name_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="could not be loaded offline") as e:
        load_examples("nobody/no-such-dataset-xyz")
    assert "local" in str(e.value)
    with pytest.raises(DataError, match="not found"):
        load_examples(str(tmp_path / "missing.jsonl"))


# ------------------------------------------------------------------ bad records

GOOD = alpaca(0)
BAD_CASES = {
    # name: (line written as record 2, field named in the message or None, text in the message)
    "broken_json": ('{"instruction": "x", "output": ', None, "not valid JSON"),
    "not_object": ('["instruction", "output"]', None, "JSON array"),
    "misspelled": ({"instrution": "x", "output": "y"}, "instrution", "did you mean 'instruction'"),
    "misspelled_optional": ({"instruction": "x", "output": "y", "inptu": "z"}, "inptu", "did you mean 'input'"),
    "missing": ({"instruction": "x"}, "output", "missing"),
    "wrong_type": ({"instruction": "x", "output": 5}, "output", "expected a string"),
    "empty_answer": ({"instruction": "x", "output": "  "}, "output", "empty"),
}
MSG_CASES = {
    "unknown_role": ([{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}], "messages[1].role",
                     "system, user, assistant"),
    "no_assistant": ([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], "messages",
                     "no assistant turn"),
    "assistant_first": ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}], "messages[0]",
                        "user turn must come"),
    "ends_with_user": ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                        {"role": "user", "content": "q2"}], "messages[2]", "ends with a user turn"),
    "system_later": ([{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                      {"role": "assistant", "content": "a"}], "messages[1]", "system turn"),
    "empty_assistant": ([{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}], "messages[1]",
                        "empty"),
    "turn_field": ([{"role": "user", "contnet": "q"}, {"role": "assistant", "content": "a"}],
                   "messages[0].contnet", "did you mean 'content'"),
    "turns_not_list": ("hello", "messages", "expected a list of turns"),
}
GOOD_MSG = {"messages": MULTI[1:3]}


def _check_bad(tmp_path, good, bad, field, text, name):
    path = write_jsonl(tmp_path / f"{name}.jsonl", [good, bad, good])
    with pytest.raises(DataError) as e:
        load_examples(path)
    msg = str(e.value)
    assert f"{name}.jsonl:2" in msg and text in msg and "--on-bad-record skip" in msg
    if field is not None:
        assert f"field '{field}'" in msg
    report = SkipReport()
    ex = load_examples(path, on_bad_record="skip", report=report)
    assert len(ex) == 2 and report.count() == 1 and report.skipped[0]["source"].endswith(f"{name}.jsonl:2")
    out = tmp_path / "rep" / "skipped.json"
    report.write(out)
    doc = json.loads(out.read_text())
    assert doc["count"] == 1 and sum(doc["by_problem"].values()) == 1 and doc["skipped"][0]["field"] == field


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_bad_alpaca_record(tmp_path, name):
    bad, field, text = BAD_CASES[name]
    _check_bad(tmp_path, GOOD, bad, field, text, name)


@pytest.mark.parametrize("name", sorted(MSG_CASES))
def test_bad_messages_record(tmp_path, name):
    turns, field, text = MSG_CASES[name]
    _check_bad(tmp_path, GOOD_MSG, {"messages": turns}, field, text, name)


def test_bad_sharegpt_role_lists_aliases(tmp_path):
    bad = {"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]}
    good = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    _check_bad(tmp_path, good, bad, "conversations[1].from", "human, user, gpt, assistant, chatgpt, bard, model",
               "sharegpt_role")


def test_non_utf8_line(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"instruction": "caf\xe9", "output": "x"}\n'
                     + json.dumps(GOOD).encode() + b"\n")
    with pytest.raises(DataError, match=r"latin\.jsonl:2: .*not valid UTF-8 \(byte 0xe9"):
        load_examples(str(path))
    report = SkipReport()
    assert len(load_examples(str(path), on_bad_record="skip", report=report)) == 2
    assert report.by_problem() == {"not_utf8": 1}
    j = tmp_path / "latin.json"
    j.write_bytes(b'[\n{"instruction": "a", "output": "b"},\n{"instruction": "caf\xe9", "output": "x"}]')
    with pytest.raises(DataError, match=r"latin\.json:3: .*UTF-8"):
        load_examples(str(j), on_bad_record="skip")


@pytest.mark.parametrize("name,content", [("empty.jsonl", ""), ("blank.jsonl", "\n  \n"), ("empty.json", "[]"),
                                          ("ws.json", "  ")])
def test_empty_file_fails_even_with_skip(tmp_path, name, content):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(DataError, match="no records") as e:
        load_examples(str(p), on_bad_record="skip")
    assert name in str(e.value) and "--on-bad-record" not in str(e.value)


def test_json_file_level_errors(tmp_path):
    p = tmp_path / "obj.json"
    p.write_text(json.dumps({"data": [GOOD]}))
    with pytest.raises(DataError, match="top level is a JSON object"):
        load_examples(str(p), on_bad_record="skip")
    p = tmp_path / "broken.json"
    p.write_text('[\n{"instruction": "a", "output": "b"},\n{"instruction": }\n]')
    with pytest.raises(DataError, match=r"broken\.json:3: .*not valid JSON"):
        load_examples(str(p), on_bad_record="skip")


def test_all_records_skipped_and_bad_option(tmp_path):
    p = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "x"}, "{oops", {"instruction": "y", "output": ""}])
    report = SkipReport()
    with pytest.raises(DataError, match="every record was skipped"):
        load_examples(p, on_bad_record="skip", report=report)
    assert report.by_problem() == {"empty_assistant_turn": 1, "invalid_json": 1, "missing_field": 1}
    with pytest.raises(ValueError, match="on_bad_record"):
        load_examples(p, on_bad_record="ignore")


# ------------------------------------------------------------------ chat template + loss mask


def test_builtin_template_text(tok):
    assert chat_template_of(tok) == BUILTIN_CHAT_TEMPLATE
    text = tok.apply_chat_template(MULTI[:3], tokenize=False)
    assert text == ("<s><|system|>You are a helpful assistant.<|user|>My name is Tom. I live in Oslo."
                    "<|assistant|>Nice to meet you, Tom.</s>")
    assert tok.apply_chat_template(MULTI[:2], tokenize=False, add_generation_prompt=True).endswith("<|assistant|>")


@pytest.mark.parametrize("which,close", [("builtin", "</s>"), ("chatml", "<|im_end|>")])
def test_loss_mask_covers_every_assistant_turn(tok, chatml_tok, which, close):
    t = tok if which == "builtin" else chatml_tok
    enc = encode_example(Example(messages=MULTI), t, max_seq_len=512)
    runs = supervised_runs(enc)
    answers = [m["content"] for m in MULTI if m["role"] == "assistant"]
    assert [t.decode(r).strip() for r in runs] == [a + close for a in answers]
    assert [t.decode(r, skip_special_tokens=True).strip() for r in runs] == answers
    assert enc.n_supervised == sum(map(len, runs)) and not enc.truncated
    # The closing token is the last supervised one of each run; nothing else special is supervised.
    assert all(r[-1] == t.convert_tokens_to_ids(close) for r in runs)
    assert enc.input_ids.count(t.bos_token_id) == (1 if which == "builtin" else 0)
    # The generation prompt is exactly the tokens before the last answer.
    prompt, ref = split_for_generation(Example(messages=MULTI))
    assert ref == "You live in Oslo." and prompt == MULTI[:-1]
    p = encode_prompt(prompt, t)
    assert enc.input_ids[:len(p)] == p and enc.labels[len(p)] != IGNORE_INDEX and enc.labels[len(p) - 1] == IGNORE_INDEX


def test_tokenizer_round_trip(tok, tmp_path):
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tok.name_or_path, local_files_only=True)
    text = tok.apply_chat_template(MULTI, tokenize=False)
    assert again(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert (again.bos_token, again.eos_token, again.pad_token, again.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    assert again.chat_template == BUILTIN_CHAT_TEMPLATE and len(again) <= 400
    # A word is the same token after a role marker as inside a sentence (Metaspace prepends everywhere).
    ids = tok("<|assistant|>Tom", add_special_tokens=False)["input_ids"]
    assert ids[1:] == tok("Tom", add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="vocab_size"):
        train_sentencepiece_tokenizer(["a b"], tmp_path / "small", vocab_size=100)


def test_truncation_accounting(tok, tmp_path):
    ex = Example(messages=MULTI, source="f.jsonl:4")
    full = encode_example(ex, tok, 512)
    prompt_len = len(encode_prompt(MULTI[:2], tok))
    cut = encode_example(ex, tok, prompt_len + 2)   # two tokens of the first answer survive
    assert cut.truncated and cut.n_supervised == 2 and len(cut.input_ids) == prompt_len + 2
    assert cut.input_ids == full.input_ids[:prompt_len + 2] and cut.labels == full.labels[:prompt_len + 2]
    none_left = encode_example(ex, tok, prompt_len)
    assert none_left.truncated and none_left.n_supervised == 0
    short = Example(messages=MULTI[1:3], source="f.jsonl:5")
    with pytest.raises(DataError, match=r"f\.jsonl:4: field 'messages': no assistant token"):
        encode_examples([short, ex], tok, prompt_len)
    report = SkipReport()
    out = encode_examples([short, ex, ex], tok, prompt_len + 2, on_bad_record="skip", report=report)
    assert out[0] is not None and not out[0].truncated and out[1].truncated and out[2].index == 2
    assert report.events["truncated"] == 2 and report.count() == 0
    out = encode_examples([short, ex], tok, prompt_len, on_bad_record="skip", report=report)
    assert out[1] is None and report.by_problem() == {"no_supervised_tokens": 1}
    assert out[0].truncated and out[0].n_supervised > 0   # the shorter one keeps part of its answer
    report.write(tmp_path / "r.json")
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["count"] == 1 and doc["events"] == {"truncated": 3}
    with pytest.raises(DataError, match="no example has a supervised token"):
        encode_examples([ex], tok, 3, on_bad_record="skip", report=report)


def test_bad_templates_are_named(chatml_tok):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(chatml_tok.name_or_path, local_files_only=True)
    # Writes the turns newest first: not prefix-consistent.
    t.chat_template = "{% for m in messages|reverse %}{{ m['role'] + ':' + m['content'] + eos_token }}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="prefix-consistent"):
        encode_example(Example(messages=MULTI), t, 512)
    # Never closes an assistant turn: the model could not learn to stop.
    t.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + ' ' }}{% endfor %}"
                       "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    with pytest.raises(ChatTemplateError, match="no control token"):
        encode_example(Example(messages=MULTI), t, 512)
    t.chat_template = "{{ raise_exception('no system role') }}"
    with pytest.raises(ChatTemplateError, match="x.jsonl:1.*no system role"):
        encode_example(Example(messages=MULTI, source="x.jsonl:1"), t, 512)


# ------------------------------------------------------------------ sampler

def test_sampler_deterministic_and_epochs():
    a, b = EpochSampler(10, seed=3), EpochSampler(10, seed=3)
    draws = [a.draw(5) for _ in range(6)]
    assert draws == [b.draw(5) for _ in range(6)]
    for e in range(3):   # each epoch is a permutation of the dataset
        assert sorted(draws[2 * e] + draws[2 * e + 1]) == list(range(10))
    assert draws[0] + draws[1] != draws[2] + draws[3]
    assert EpochSampler(10, seed=4).draw(10) != EpochSampler(10, seed=3).draw(10)


def test_sampler_epoch_end_drops_leftover():
    s = EpochSampler(10, seed=0)
    perm0 = s.permutation(0).tolist()
    assert s.draw(4) == perm0[:4] and s.draw(4) == perm0[4:8] and (s.epoch, s.remaining) == (0, 2)
    nxt = s.draw(4)   # 2 left < 4: they are dropped, epoch 1 starts
    assert nxt == s.permutation(1).tolist()[:4] and (s.epoch, s.position) == (1, 4)
    with pytest.raises(ValueError):
        s.draw(11)


def test_sampler_state_round_trip():
    a = EpochSampler(17, seed=9)
    for _ in range(5):
        a.draw(4)
    b = EpochSampler(17, seed=9)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert [a.draw(4) for _ in range(8)] == [b.draw(4) for _ in range(8)]
    c = EpochSampler(17, seed=1)
    warned = c.load_state_dict(a.state_dict())  # the checkpoint's seed wins, and the recipe logs why
    assert c.seed == 9 and c.draw(4) == a.draw(4)
    assert len(warned) == 1 and "seed 9" in warned[0] and "seed 1" in warned[0]
    with pytest.raises(ValueError, match="17"):
        EpochSampler(16, seed=9).load_state_dict(a.state_dict())
