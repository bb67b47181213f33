"""Instruction data formats -> `Example` (a list of chat messages, the record's tools, untrained turns).

Formats (detected per file from the first record whose keys match, or forced with `fmt`):

    alpaca    {"instruction": str, "output": str, "input": str?, "system": str?, "history": [[str, str], ...]?}
              user turn = instruction, plus a blank line and the input when the input is non-empty;
              "history" (LLaMA-Factory): earlier [user, assistant] exchanges, in order, trained like the last
    sharegpt  {"conversations": [{"from": str, "value": str, "weight"?, "train"?}, ...], "system": str?,
               "tools": [...] or its JSON string?}
              from: human/user -> user; gpt/assistant/chatgpt/bard/model -> assistant; system -> system;
              function_call -> an assistant tool call; observation/tool -> a tool result (case-insensitive)
    messages  {"messages": [{"role": str, "content": str, "tool_calls"?, "tool_call_id"?, "name"?, "weight"?,
               "train"?}, ...], "tools": [...]?}
              role: system, user, assistant or tool (exactly; no aliases)

Turns, tool calls, per-turn "weight" / "train" and the conversation rules: `optbatch_ds.data.turns`.
Any record may carry "task" (a string; default "default") and metadata kept in `Example.meta` and never
shown to the model: "id", "source", "category", "lang", "language", "defect" (the demo's label), "meta",
"metadata", and for alpaca "text" (the pre-rendered prompt some Alpaca copies carry). Any other key is
an error naming it (never ignored); a null optional field counts as absent (parquet fills missing
columns with nulls).

Usage:
    report = SkipReport()
    examples = load_examples("data/train.jsonl", on_bad_record="skip", report=report)
    report.write("out/skipped.json")
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from optbatch_ds.errors import ConfigError, closest

from .errors import DataError, SkipReport, check_on_bad_record, handle
from .readers import data_files_in, iter_hub_records, iter_records
from .turns import check_conversation, parse_tools, parse_turns, type_name, unknown_key_error

logger = logging.getLogger(__name__)

FORMATS = ("alpaca", "sharegpt", "messages")

# Top-level fields each format knows: (required, optional). "task" and the metadata fields are common to all.
_FIELDS = {
    "alpaca": (("instruction", "output"), ("input", "system", "history")),
    "sharegpt": (("conversations",), ("system", "tools")),
    "messages": (("messages",), ("tools",)),
}
METADATA_FIELDS = ("id", "source", "category", "lang", "language", "defect", "meta", "metadata")
_EXTRA_METADATA = {"alpaca": ("text",)}
# One record of each format, as `launch/train.py --help` shows them (tests/unit/test_formats_users.py loads them).
FORMAT_EXAMPLES = (
    ("alpaca", '{"instruction": "And doubled?", "input": "", "output": "16", "system": "Be brief.", '
               '"history": [["What is 3 plus 5?", "8"]]}'),
    ("sharegpt", '{"conversations": [{"from": "human", "value": "A 40 dollar lamp, 25 percent off?"}, '
                 '{"from": "function_call", "value": "{\\"name\\": \\"discount\\", \\"arguments\\": '
                 '{\\"price\\": 40, \\"pct\\": 25}}"}, {"from": "observation", "value": "30"}, '
                 '{"from": "gpt", "value": "30 dollars.", "weight": 1}], '
                 '"tools": [{"name": "discount", "description": "apply a percentage discount"}]}'),
    ("messages", '{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": '
                 '"Add 2 and 3."}, {"role": "assistant", "content": "5"}], "task": "math"}'),
)


def formats_help() -> str:
    """The record formats with one example each (the epilog of launch/train.py --help)."""
    lines = ["record formats of --data / --eval-data (JSON Lines, a JSON array or parquet; detected from the keys;",
             "tool calls, per-turn weight / train and metadata: README, 'Record formats'), one example each:"]
    lines += [f"  {name:<9} {example}" for name, example in FORMAT_EXAMPLES]
    return "\n".join(lines)


_FORMAT_HELP = ("alpaca (instruction, output, optional input, system and history), "
                "sharegpt (conversations: [{from, value}]), messages (messages: [{role, content}])")


@dataclass
class Example:
    messages: list[dict]
    task: str = "default"
    source: str = ""
    meta: dict = field(default_factory=dict)
    tools: list[dict] | None = None          # the record's tools, passed to the chat template
    untrained: frozenset[int] = frozenset()  # assistant turns marked weight 0 / train false: in the text, not the loss


def load_examples(spec: str, fmt: str = "auto", on_bad_record: str = "error",
                  report: SkipReport | None = None, split: str = "train") -> list[Example]:
    """Load a file, a folder of files, or an offline `datasets` dataset as `Example`s.

    With on_bad_record="error" the first bad record raises a DataError; with "skip" bad records
    are recorded in `report` (and logged) and loading goes on. File-level problems (empty file,
    unparseable .json, unknown format) and "every record was skipped" always raise.
    """
    check_on_bad_record(on_bad_record)
    if fmt != "auto" and fmt not in FORMATS:
        close = _suggest(fmt, FORMATS)
        raise ConfigError(f"unknown data format {fmt!r}; choose 'auto' or one of {FORMATS}"
                         + (f"; did you mean {close!r}?" if close else ""))
    report = report if report is not None else SkipReport()
    spec = os.fspath(spec)
    skipped_before = report.count()

    if os.path.isdir(spec):
        streams = [(p, iter_records(p)) for p in data_files_in(spec)]
    elif os.path.isfile(spec):
        streams = [(spec, iter_records(spec))]
    elif spec.endswith((".json", ".jsonl", ".parquet")) or os.sep in spec and spec.startswith((".", os.sep)):
        raise DataError(spec, None, "file or folder not found", "an existing .json/.jsonl/.parquet file "
                        "or folder", kind="not_found", skippable=False)
    else:
        streams = [(spec, iter_hub_records(spec, split))]

    examples: list[Example] = []
    for name, stream in streams:
        examples.extend(_parse_stream(name, stream, fmt, on_bad_record, report))

    skipped = report.count() - skipped_before
    if skipped:
        logger.warning("%s: %s", spec, report.summary())
    if not examples:
        raise DataError(spec, None, f"every record was skipped ({skipped} bad records; "
                        f"see the skip report: {report.by_problem()})", "at least one valid record",
                        kind="no_records", skippable=False)
    return examples


def _parse_stream(name, stream, fmt, on_bad_record, report) -> list[Example]:
    # Records are buffered until the format is known: detection may look past bad records.
    pending: list[tuple[str, object]] = []
    detected = None if fmt == "auto" else fmt
    out: list[Example] = []
    for source, record in stream:
        if detected is None:
            pending.append((source, record))
            if isinstance(record, dict):
                detected = detect_format(record)
            if detected is None:
                continue
            for s, r in pending:
                _parse_one(s, r, detected, on_bad_record, report, out)
            pending = []
        else:
            _parse_one(source, record, detected, on_bad_record, report, out)
    if detected is None:  # no record of the whole file matched a format
        first = next(((s, r) for s, r in pending if isinstance(r, dict)), None)
        if first is None:  # nothing readable at all: report each record, then fail below
            for s, r in pending:
                _parse_one(s, r, "messages", on_bad_record, report, out)
            return out
        s, r = first
        hints = "".join(_did_you_mean(k, _ALL_FIELDS) for k in r if k not in _ALL_FIELDS)
        raise DataError(s, None, f"unknown format: the first record has keys {sorted(r)}{hints}",
                        f"one of {_FORMAT_HELP}; rename the fields, or force a format with "
                        "--data-format alpaca|sharegpt|messages", kind="unknown_format", skippable=False)
    return out


_ALL_FIELDS = tuple(sorted({f for req, opt in _FIELDS.values() for f in req + opt} | {"task"}))


def detect_format(record: dict) -> str | None:
    """The format whose required fields the record has (alpaca, sharegpt, messages), or None."""
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "conversations" in record:
        return "sharegpt"
    if "messages" in record:
        return "messages"
    return None


def _parse_one(source, record, fmt, on_bad_record, report, out) -> None:
    try:
        if isinstance(record, DataError):
            raise record
        out.append(parse_record(record, fmt, source))
    except DataError as err:
        handle(err, on_bad_record, report)


def _did_you_mean(name: str, valid) -> str:
    close = _suggest(name, valid)
    return f"; field '{name}' is not known; did you mean '{close}'?" if close else ""


def _suggest(name: str, valid) -> str | None:
    return closest(name, valid, cutoff=0.6)


def _missing(source, record: dict, name: str, known, what: str, prefix: str = "") -> DataError:
    """A missing required field; names the unknown field that looks like a misspelling of it."""
    for k in record:
        if k not in known and _suggest(k, [name]) == name:
            return DataError(source, prefix + k, f"field '{k}' is not known; did you mean '{name}'?",
                             what, kind="unknown_field")
    return DataError(source, prefix + name, "missing", what, kind="missing_field")


def _get_str(source, record: dict, name: str, required: bool, known, prefix: str = "") -> str | None:
    if name not in record or record[name] is None:
        if required:
            raise _missing(source, record, name, known, "a string", prefix)
        return None
    value = record[name]
    if not isinstance(value, str):
        raise DataError(source, prefix + name, f"is a {type_name(value)}", "a string", kind="wrong_type")
    return value


def _check_keys(source, record: dict, fmt: str) -> tuple[set, set]:
    """(format fields, metadata fields); an unknown key is a DataError naming it (a typo of a field the record
    lacks says so), unless its value is null."""
    required, optional = _FIELDS[fmt]
    known = set(required) | set(optional) | {"task"}
    metadata = set(METADATA_FIELDS) | set(_EXTRA_METADATA.get(fmt, ()))
    absent = sorted(known - set(record))
    unknown = [k for k in record if k not in known and k not in metadata]
    for k in unknown:
        close = closest(k, absent, cutoff=0.75)
        if close:
            raise DataError(source, k, f"field '{k}' is not known; did you mean '{close}'?",
                            f"the fields of the {fmt} format", kind="unknown_field")
    for name in required:  # a record of another format: say what is missing before what is unknown
        if record.get(name) is None:
            raise _missing(source, record, name, known, "a string" if fmt == "alpaca" else "a list of turns")
    for k in unknown:
        if record[k] is not None:
            raise unknown_key_error(source, k, list(required + optional) + ["task"] + sorted(metadata),
                                    f"the {fmt} format (metadata included)")
    return known, metadata


def parse_record(record, fmt: str, source: str) -> Example:
    """One raw record in format `fmt` -> Example, or DataError naming source and field."""
    if not isinstance(record, dict):
        raise DataError(source, None, f"the record is a {type_name(record)}", "a JSON object "
                        f"with the fields of the {fmt} format", kind="not_an_object")
    known, metadata = _check_keys(source, record, fmt)
    if fmt == "alpaca":
        (messages, paths), untrained, tools = _alpaca(source, record, known), set(), None
    else:
        list_field = _FIELDS[fmt][0][0]
        if list_field not in record or record[list_field] is None:
            raise _missing(source, record, list_field, known, "a list of turns")
        messages, paths, untrained = parse_turns(source, fmt, list_field, record[list_field])
        tools = parse_tools(source, record.get("tools"))
        system = _get_str(source, record, "system", False, known) if fmt == "sharegpt" else None
        if system is not None:
            if messages and messages[0]["role"] == "system":
                raise DataError(source, "system", "given both as a field and as the first turn",
                                "one system message", kind="bad_turn_order")
            messages.insert(0, {"role": "system", "content": system})
            paths.insert(0, "system")
            untrained = {j + 1 for j in untrained}
    check_conversation(source, messages, paths, untrained)
    task = _get_str(source, record, "task", False, known)
    meta = {k: v for k, v in record.items() if k in metadata}
    return Example(messages=messages, task=task or "default", source=source, meta=meta, tools=tools,
                   untrained=frozenset(untrained))


def example_record(example: Example) -> dict:
    """A messages-format record that reads back as `example` (its turns with their tool calls, the untrained
    turns as "train": false, its tools and task; metadata left out): for files written from loaded examples."""
    messages = [dict(m, train=False) if j in example.untrained else m for j, m in enumerate(example.messages)]
    record = {"messages": messages, "task": example.task}
    if example.tools:
        record["tools"] = example.tools
    return record


def _alpaca(source, record: dict, known) -> tuple[list[dict], list[str]]:
    """(messages, the field each comes from) of an Alpaca record."""
    instruction = _get_str(source, record, "instruction", True, known)
    output = _get_str(source, record, "output", True, known)
    inp = _get_str(source, record, "input", False, known)
    system = _get_str(source, record, "system", False, known)
    messages, paths = ([{"role": "system", "content": system}], ["system"]) if system is not None else ([], [])
    history = record.get("history")
    if history is not None:
        if not isinstance(history, list):
            raise DataError(source, "history", f"is a {type_name(history)}",
                            "a list of [instruction, response] pairs", kind="wrong_type")
        for i, pair in enumerate(history):
            if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                    or not all(isinstance(x, str) for x in pair)):
                raise DataError(source, f"history[{i}]", f"is {str(pair)[:60]}",
                                "an [instruction, response] pair of strings", kind="wrong_type")
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
            paths += [f"history[{i}][0]", f"history[{i}][1]"]
    user = instruction + ("\n\n" + inp if inp and inp.strip() else "")
    return (messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}],
            paths + ["instruction", "output"])
