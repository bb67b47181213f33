"""Instruction data formats -> `Example` (a list of chat messages).

Formats (detected per file from the first record whose keys match, or forced with `fmt`):

    alpaca    {"instruction": str, "output": str, "input": str?, "system": str?}
              user turn = instruction, plus a blank line and the input when the input is non-empty
    sharegpt  {"conversations": [{"from": str, "value": str}, ...], "system": str?}
              from: human/user -> user; gpt/assistant/chatgpt/bard/model -> assistant; system -> system
              (case-insensitive)
    messages  {"messages": [{"role": str, "content": str}, ...]}
              role: system, user or assistant (exactly; no aliases)

Any record may carry "task" (a string; default "default"); other fields go to `Example.meta`.
A null optional field counts as absent (parquet fills missing columns with nulls).

Conversation rules, checked for every format after mapping roles:
  * at most one system turn, and only as the first turn;
  * then user and assistant strictly alternate, starting with user;
  * the last turn is an assistant turn (there is something to learn and a reference to compare
    against), and no assistant turn is empty or whitespace-only.

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

logger = logging.getLogger(__name__)

FORMATS = ("alpaca", "sharegpt", "messages")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "model": "assistant", "system": "system"}

# Top-level fields each format knows: (required, optional). "task" is common to all.
_FIELDS = {
    "alpaca": (("instruction", "output"), ("input", "system")),
    "sharegpt": (("conversations",), ("system",)),
    "messages": (("messages",), ()),
}
_TURN_FIELDS = {"sharegpt": ("from", "value"), "messages": ("role", "content")}
_FORMAT_HELP = ("alpaca (instruction, output, optional input and system), "
                "sharegpt (conversations: [{from, value}]), messages (messages: [{role, content}])")


@dataclass
class Example:
    messages: list[dict]
    task: str = "default"
    source: str = ""
    meta: dict = field(default_factory=dict)


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
        raise DataError(source, prefix + name, f"is a {_type_name(value)}", "a string", kind="wrong_type")
    return value


def _type_name(value) -> str:
    return {dict: "JSON object", list: "JSON array", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def parse_record(record, fmt: str, source: str) -> Example:
    """One raw record in format `fmt` -> Example, or DataError naming source and field."""
    if not isinstance(record, dict):
        raise DataError(source, None, f"the record is a {_type_name(record)}", "a JSON object "
                        f"with the fields of the {fmt} format", kind="not_an_object")
    required, optional = _FIELDS[fmt]
    known = set(required) | set(optional) | {"task"}
    # An unknown key that looks like a known field the record lacks is a typo, not metadata:
    # keeping it in meta would silently drop e.g. a misspelled "input".
    absent = sorted(known - set(record))
    for k in record:
        if k not in known:
            close = closest(k, absent, cutoff=0.75)
            if close:
                raise DataError(source, k, f"field '{k}' is not known; did you mean '{close}'?",
                                f"the fields of the {fmt} format", kind="unknown_field")
    if fmt == "alpaca":
        instruction = _get_str(source, record, "instruction", True, known)
        output = _get_str(source, record, "output", True, known)
        inp = _get_str(source, record, "input", False, known)
        system = _get_str(source, record, "system", False, known)
        user = instruction + ("\n\n" + inp if inp and inp.strip() else "")
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": user}, {"role": "assistant", "content": output}]
        shift = 0
    else:
        list_field = required[0]
        if list_field not in record or record[list_field] is None:
            raise _missing(source, record, list_field, known, "a list of turns")
        turns = record[list_field]
        if not isinstance(turns, list):
            raise DataError(source, list_field, f"is a {_type_name(turns)}", "a list of turns",
                            kind="wrong_type")
        messages = [_parse_turn(source, fmt, list_field, i, t) for i, t in enumerate(turns)]
        shift = 0
        if fmt == "sharegpt":
            system = _get_str(source, record, "system", False, known)
            if system is not None:
                if messages and messages[0]["role"] == "system":
                    raise DataError(source, "system", "given both as a field and as the first turn",
                                    "one system message", kind="bad_turn_order")
                messages.insert(0, {"role": "system", "content": system})
                shift = 1
    _check_conversation(source, messages, fmt, shift)
    task = _get_str(source, record, "task", False, known)
    meta = {k: v for k, v in record.items() if k not in known}
    return Example(messages=messages, task=task or "default", source=source, meta=meta)


def _parse_turn(source, fmt, list_field, i, turn) -> dict:
    prefix = f"{list_field}[{i}]."
    role_key, content_key = _TURN_FIELDS[fmt]
    if not isinstance(turn, dict):
        raise DataError(source, f"{list_field}[{i}]", f"is a {_type_name(turn)}",
                        f"an object {{{role_key}, {content_key}}}", kind="wrong_type")
    known = {role_key, content_key}
    role = _get_str(source, turn, role_key, True, known, prefix)
    content = _get_str(source, turn, content_key, True, known, prefix)
    if fmt == "sharegpt":
        mapped = SHAREGPT_ROLES.get(role.lower())
        valid = ", ".join(SHAREGPT_ROLES)
    else:
        mapped = role if role in ROLES else None
        valid = ", ".join(ROLES)
    if mapped is None:
        raise DataError(source, prefix + role_key, f"unknown role '{role}'", f"one of: {valid}",
                        kind="unknown_role")
    return {"role": mapped, "content": content}


def _check_conversation(source, messages: list[dict], fmt: str, shift: int = 0) -> None:
    """Turn-order rules (see the module docstring). `shift`: leading messages not from the list
    field (a sharegpt "system" field), so errors name the record's own turn index."""
    list_field = {"alpaca": None, "sharegpt": "conversations", "messages": "messages"}[fmt]

    def where(j: int) -> str:
        if list_field is None:
            return "output" if messages[j]["role"] == "assistant" else "instruction"
        return f"{list_field}[{j - shift}]" if j >= shift else "system"

    roles = [m["role"] for m in messages]
    start = 1 if roles[:1] == ["system"] else 0
    for j in range(start, len(roles)):
        want = "user" if (j - start) % 2 == 0 else "assistant"
        if roles[j] == "system":
            raise DataError(source, where(j), "a system turn after the first turn",
                            "at most one system turn, and only as the first turn", kind="bad_turn_order")
        if roles[j] != want:
            raise DataError(source, where(j), f"a {roles[j]} turn where a {want} turn must come",
                            "user and assistant turns alternating, starting with user "
                            "(after an optional system turn)", kind="bad_turn_order")
    if "assistant" not in roles:
        raise DataError(source, list_field or "output", "the conversation has no assistant turn",
                        "at least one user turn followed by an assistant turn", kind="no_assistant_turn")
    if roles[-1] != "assistant":
        raise DataError(source, where(len(roles) - 1), "the conversation ends with a user turn",
                        "the last turn to be the assistant's answer", kind="bad_turn_order")
    for j, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            raise DataError(source, where(j), "the assistant turn is empty", "a non-empty answer",
                            kind="empty_assistant_turn")
