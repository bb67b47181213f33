"""Records as TRL, LLaMA-Factory and axolotl users write them: history, tool calls, per-turn flags, unknown keys,
byte-order marks, misnamed files.

    python -m pytest tests/unit/test_formats_users.py -q
"""
import json
import logging
import os

import pytest

from optbatch_ds.data import DataError, SkipReport, load_examples
from optbatch_ds.data.readers import file_kind

pytestmark = pytest.mark.unit

CASES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "cases")
Q, A = {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def _one(tmp_path, record, **kw):
    return load_examples(write_jsonl(tmp_path / "d.jsonl", [record]), **kw)[0]


def _refused(tmp_path, record, field, *needles):
    """The record (line 2 between two good ones) stops loading naming file, line and field; with skip it is
    counted and the others are kept."""
    good = {"conversations": [Q, A]} if "conversations" in record else (
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
        if "messages" in record else {"instruction": "q", "output": "a"})
    path = write_jsonl(tmp_path / "bad.jsonl", [good, record, good])
    with pytest.raises(DataError) as e:
        load_examples(path)
    msg = str(e.value)
    assert f"bad.jsonl:2: field '{field}'" in msg, msg
    for needle in needles:
        assert needle in msg, msg
    report = SkipReport()
    assert len(load_examples(path, on_bad_record="skip", report=report)) == 2 and report.count() == 1
    return report.skipped[0]["kind"]


def test_help_examples_load_as_their_format(tmp_path, capsys):
    from optbatch_ds.config import parse_args
    from optbatch_ds.data.formats import FORMAT_EXAMPLES

    for name, example in FORMAT_EXAMPLES:
        path = tmp_path / f"{name}.jsonl"
        path.write_text(example + "\n", encoding="utf-8")
        assert load_examples(str(path), fmt=name)[0].messages[-1]["role"] == "assistant"
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--chat-template" in out and all(example in out for _, example in FORMAT_EXAMPLES)


# ---------------------------------------------------------------------------- alpaca history

def test_alpaca_history_becomes_earlier_turns(tmp_path):
    ex = _one(tmp_path, {"instruction": "And doubled?", "input": "", "output": "16", "system": "Be brief.",
                         "history": [["What is 3 plus 5?", "8"], ["And minus 1?", "7"]]})
    assert [(m["role"], m["content"]) for m in ex.messages] == [
        ("system", "Be brief."), ("user", "What is 3 plus 5?"), ("assistant", "8"), ("user", "And minus 1?"),
        ("assistant", "7"), ("user", "And doubled?"), ("assistant", "16")]
    assert _one(tmp_path, {"instruction": "q", "output": "a", "history": []}).messages[0]["role"] == "user"


@pytest.mark.parametrize("history,field", [("q a", "history"), ([["q"]], "history[0]"), ([["q", 5]], "history[0]"),
                                           ([["q", "a"], ["q2", "  "]], "history[1][1]")])
def test_bad_alpaca_history(tmp_path, history, field):
    _refused(tmp_path, {"instruction": "q", "output": "a", "history": history}, field)


# ---------------------------------------------------------------------------- tools

def test_sharegpt_function_call_observation_and_tools_string():
    path = os.path.join(CASES, "tool_turns", "tools.jsonl")
    ex = load_examples(path)
    call = ex[4]
    assert [m["role"] for m in call.messages] == ["user", "assistant", "tool", "assistant"]
    assert call.messages[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "discount", "arguments": {"price": 40, "pct": 25}}}]}
    assert call.messages[2] == {"role": "tool", "content": '{"price": 30}'}
    assert call.tools == [{"type": "function", "function": {"name": "discount",
                                                            "description": "apply a percentage discount"}}]
    assert ex[0].tools is None
    only = load_examples(os.path.join(CASES, "tool_turns", "tools_field_only.jsonl"))
    assert only[4].tools[0]["function"]["name"] == "discount" and len(only[4].messages) == 2


def test_messages_tool_calls_openai_style(tmp_path):
    ex = _one(tmp_path, {"messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "name": "weather", "content": "-3 C"},
        {"role": "assistant", "content": "It is -3 C in Oslo."}],
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]})
    assert ex.messages[1]["tool_calls"] == [{"type": "function", "id": "c1",
                                             "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]
    assert ex.messages[2] == {"role": "tool", "content": "-3 C", "tool_call_id": "c1", "name": "weather"}
    assert ex.tools[0]["function"]["parameters"] == {"type": "object"}


@pytest.mark.parametrize("record,field,needle", [
    ({"conversations": [Q, {"from": "function_call", "value": "discount(40)"}, {"from": "observation", "value": "30"},
                        A]}, "conversations[1].value", "not JSON"),
    ({"conversations": [Q, {"from": "function_call", "value": '{"arguments": {}}'},
                        {"from": "observation", "value": "30"}, A]}, "conversations[1].value[0]", "without a name"),
    ({"conversations": [Q, A], "tools": "[{'name': 'x'}]"}, "tools", "not JSON"),
    ({"conversations": [Q, A], "tools": [{"description": "x"}]}, "tools[0]", "without a name"),
    ({"conversations": [Q, {"from": "observation", "value": "30"}, A]}, "conversations[1]",
     "a tool turn where a assistant turn must come"),
    ({"conversations": [Q, {"from": "function_call", "value": '{"name": "f", "arguments": {}}'}, Q, A]},
     "conversations[2]", "a user turn where a tool turn must come"),
    ({"conversations": [Q, {"from": "function_call", "value": '{"name": "f", "arguments": {}}'},
                        {"from": "observation", "value": "30"}]}, "conversations[2]", "ends with a tool turn"),
    ({"messages": [{"role": "user", "content": "q", "tool_calls": [{"name": "f"}]},
                   {"role": "assistant", "content": "a"}]}, "messages[0].tool_calls", "assistant turns only"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [
        {"function": {"name": "f", "arguments": "{oops"}}]}, {"role": "tool", "content": "1"},
        {"role": "assistant", "content": "a"}]}, "messages[1].tool_calls[0].arguments", "not JSON"),
])
def test_bad_tool_records(tmp_path, record, field, needle):
    _refused(tmp_path, record, field, needle)


# ---------------------------------------------------------------------------- per-turn flags and unknown keys

def test_turn_weight_case_marks_the_wrong_turn_untrained():
    ex = load_examples(os.path.join(CASES, "turn_weight", "turn_weight.jsonl"))
    assert ex[3].untrained == frozenset({1}) and ex[3].messages[1]["content"] == "It is 75."
    assert all(not e.untrained for i, e in enumerate(ex) if i != 3)
    assert all(set(m) == {"role", "content"} for m in ex[3].messages)  # the flags never reach the template


@pytest.mark.parametrize("flags,untrained", [({"weight": 0}, {2}), ({"train": False}, {2}), ({"weight": 1}, set()),
                                             ({"weight": 0.0, "train": False}, {2}), ({"train": True}, set())])
def test_turn_flags(tmp_path, flags, untrained):
    conv = [{"from": "system", "value": "s"}, Q, {**A, **flags}, Q, A]
    assert _one(tmp_path, {"conversations": conv}).untrained == frozenset(untrained)
    # a sharegpt "system" field shifts the indices with the messages
    rec = {"conversations": [Q, {**A, **flags}, Q, A], "system": "s"}
    assert _one(tmp_path, rec).untrained == frozenset(untrained)


@pytest.mark.parametrize("turns,field,needle,kind", [
    ([Q, {**A, "weight": 0.5}, Q, A], "conversations[1].weight", "0 (not trained) or 1", "bad_turn_flag"),
    ([Q, {**A, "train": "no"}, Q, A], "conversations[1].train", "true or false", "bad_turn_flag"),
    ([{**Q, "weight": 1}, A], "conversations[0].weight", "only assistant turns are trained", "bad_turn_flag"),
    ([Q, {**A, "weight": 0, "train": True}], "conversations[1].train", "disagrees", "bad_turn_flag"),
    ([Q, {**A, "weight": 0}], "conversations[1]", "every assistant turn is marked weight 0", "no_trained_turn"),
    ([Q, {**A, "mask": True}], "conversations[1].mask", "field 'mask' is not known", "unknown_field"),
    ([Q, {**A, "weigth": 0}], "conversations[1].weigth", "did you mean 'weight'", "unknown_field"),
    ([Q, {**A, "loss": False}], "conversations[1].loss", "from, value, weight, train", "unknown_field"),
])
def test_bad_turn_keys_name_file_line_and_key(tmp_path, turns, field, needle, kind):
    assert _refused(tmp_path, {"conversations": turns}, field, needle) == kind


def test_user_turn_flags_that_change_nothing_are_accepted(tmp_path):
    ex = _one(tmp_path, {"conversations": [{**Q, "weight": 0}, A, {**Q, "train": False}, A]})
    assert ex.untrained == frozenset()


@pytest.mark.parametrize("record,field", [
    ({"instruction": "q", "output": "a", "chosen": "b"}, "chosen"),
    ({"conversations": [Q, A], "images": ["x.png"]}, "images"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "rejected": "b"},
     "rejected"),
    ({"messages": [{"role": "user", "content": "q", "thinking": "x"}, {"role": "assistant", "content": "a"}]},
     "messages[0].thinking"),
])
def test_unknown_record_and_turn_keys_are_errors(tmp_path, record, field):
    assert _refused(tmp_path, record, field, f"field '{field.split('.')[-1]}' is not known") == "unknown_field"


def test_metadata_kept_and_nulls_ignored(tmp_path):
    ex = _one(tmp_path, {"conversations": [{**Q, "weight": None, "extra": None}, A], "id": "r7", "source": "web",
                         "images": None, "task": "qa"})
    assert ex.meta == {"id": "r7", "source": "web"} and ex.task == "qa"
    assert _one(tmp_path, {"instruction": "q", "output": "a", "text": "### Instruction: q"}).meta == {
        "text": "### Instruction: q"}


# ---------------------------------------------------------------------------- byte-order marks, misnamed files

@pytest.mark.parametrize("name", ["bom.json", "bom.jsonl"])
def test_byte_order_mark_is_dropped(name):
    path = os.path.join(CASES, "bom", name)
    with open(path, "rb") as f:
        assert f.read(3) == b"\xef\xbb\xbf"
    report = SkipReport()
    ex = load_examples(path, on_bad_record="skip", report=report)
    assert len(ex) == 16 and report.count() == 0
    first_line = 2 if name == "bom.json" else 1  # the .json array's first record starts on line 2
    assert ex[0].messages[0]["content"] == "Add 55 and 25." and ex[0].source == f"{path}:{first_line}"


@pytest.mark.parametrize("name,kind,n", [("array_oneline.jsonl", "json", 16), ("array_pretty.jsonl", "json", 16),
                                         ("lines_named.json", "jsonl", 16)])
def test_content_is_detected_whatever_the_suffix(name, kind, n, caplog):
    path = os.path.join(CASES, "array_in_jsonl", name)
    assert file_kind(path) == kind
    report = SkipReport()
    with caplog.at_level(logging.WARNING):
        ex = load_examples(path, on_bad_record="skip", report=report)
    assert len(ex) == n and report.count() == 0
    assert [e.messages[-1]["content"] for e in ex[:2]] == ["The sum is 80.", "Oslo"]
    want = ".json" if kind == "json" else ".jsonl"
    assert any(f"rename it to *{want}" in r.getMessage() for r in caplog.records)
    if name == "array_pretty.jsonl":
        assert ex[1].source == f"{path}:7"  # the line the record starts on, as for a .json file


def test_detection_keeps_what_the_suffix_says_when_both_fit(tmp_path):
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"data": []}))
    assert file_kind(str(one)) == "json"  # one object on one line named .json: its top level is an object
    lines = tmp_path / "lines.jsonl"
    lines.write_text('["not", "a record"]\n{"instruction": "q", "output": "a"}\n')
    assert file_kind(str(lines)) == "jsonl"  # a .jsonl whose first line is an array: still lines
    report = SkipReport()
    assert len(load_examples(str(lines), on_bad_record="skip", report=report)) == 1
    assert report.by_problem() == {"not_an_object": 1}
    txt = tmp_path / "data.txt"
    txt.write_text('{"instruction": "q", "output": "a"}\n')
    assert file_kind(str(txt)) == "jsonl" and len(load_examples(str(txt))) == 1


def test_utf16_file_says_so(tmp_path):
    path = tmp_path / "u16.jsonl"
    path.write_bytes('{"instruction": "q", "output": "a"}\n'.encode("utf-16"))
    with pytest.raises(DataError, match="UTF-16 byte-order mark.*save it as UTF-8"):
        load_examples(str(path))


@pytest.mark.parametrize("folder,name", [("bom", "bom.json"), ("bom", "bom.jsonl"),
                                         ("array_in_jsonl", "array_pretty.jsonl"),
                                         ("array_in_jsonl", "array_oneline.jsonl"),
                                         ("array_in_jsonl", "lines_named.json")])
def test_offline_pruning_maps_and_writes_the_same_records(tmp_path, folder, name):
    """launch/prune.py re-reads the input to write the kept records in its own format: it must see the records the
    data layer saw (byte-order mark, content over suffix) and write a file that loads back to them."""
    from optbatch_ds import prune

    path = os.path.join(CASES, folder, name)
    examples = load_examples(path)
    files = prune._raw_files(path)
    kept = prune._match_examples(files, examples, "auto")
    out = tmp_path / f"kept{os.path.splitext(name)[1]}"
    prune.write_kept(files, kept[:3], str(out))
    assert [e.messages for e in load_examples(str(out))] == [e.messages for e in examples[:3]]


def test_record_hash_keys_what_changes_the_loss(tmp_path):
    """Reference losses are keyed by data.hashing.record_hash: a plain conversation hashes as it always has (so
    reference losses written before tools and turn flags were read still match), while tool calls, the record's
    tools and untrained turns each change the key; a record written back by example_record reads back to the
    same example and key (launch/reference.py's halves)."""
    from optbatch_ds.data import example_record
    from optbatch_ds.data.hashing import example_hash, record_hash

    plain = _one(tmp_path, {"conversations": [Q, A]})
    assert example_hash(plain) == record_hash(plain.messages) == "b97259b5ad9ab7fb"  # as before: never changes
    tools = load_examples(os.path.join(CASES, "tool_turns", "tools.jsonl"))
    weights = load_examples(os.path.join(CASES, "turn_weight", "turn_weight.jsonl"))
    call, only = tools[4], load_examples(os.path.join(CASES, "tool_turns", "tools_field_only.jsonl"))[4]
    other_call = json.loads(json.dumps(call.messages))
    other_call[1]["tool_calls"][0]["function"]["arguments"]["pct"] = 50
    assert record_hash(other_call, call.tools) != example_hash(call)
    assert example_hash(only) != record_hash(only.messages)  # the tools are in the prompt
    marked = weights[3]
    assert marked.untrained and example_hash(marked) != record_hash(marked.messages)
    path = write_jsonl(tmp_path / "back.jsonl", [example_record(e) for e in (call, only, marked, plain)])
    back = load_examples(path)
    assert [example_hash(e) for e in back] == [example_hash(e) for e in (call, only, marked, plain)]
    assert [(e.messages, e.tools, e.untrained) for e in back] == [
        (e.messages, e.tools, e.untrained) for e in (call, only, marked, plain)]
