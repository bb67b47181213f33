"""Turns of a conversation as users write them -> chat messages, with every problem named by field.

    messages, paths, untrained = parse_turns(source, "sharegpt", "conversations", record["conversations"])
    tools = parse_tools(source, record.get("tools"))
    check_conversation(source, messages, paths, untrained)

Roles (sharegpt "from", case-insensitive; messages "role", exactly):
    user       sharegpt human/user;                       messages user
    assistant  sharegpt gpt/assistant/chatgpt/bard/model; messages assistant (+ "tool_calls")
    tool call  sharegpt function_call: "value" is the call as JSON, {"name", "arguments"} or a list of them
               (LLaMA-Factory); an assistant message with an empty content and the calls in "tool_calls"
    tool       sharegpt observation/tool; messages tool (+ "tool_call_id", "name"): a tool's result, never trained
    system     system (first turn only)
Per-turn keys besides role and content: "weight" (0 or 1) and "train" (true/false), axolotl's flags: an
assistant turn with weight 0 or train false stays in the text but out of the loss. Any other per-turn key
is an error naming it (a null value counts as absent, as parquet writes missing keys).
Tool calls are normalized to {"type": "function", "function": {"name", "arguments"}} with arguments as
an object (a JSON string is parsed), the form transformers' chat templates read; tools to
{"type": "function", "function": {"name", "description"?, "parameters"?}}.
"""
from __future__ import annotations

import json

from optbatch_ds.errors import closest

from .errors import DataError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "model": "assistant", "system": "system",
                  "function_call": "tool_call", "observation": "tool", "tool": "tool"}
ROLES = ("system", "user", "assistant", "tool")
TRAIN_KEYS = ("weight", "train")
_TURN_KEYS = {
    "sharegpt": ("from", "value", TRAIN_KEYS),
    "messages": ("role", "content", TRAIN_KEYS + ("tool_calls", "tool_call_id", "name")),
}


def type_name(value) -> str:
    return {dict: "JSON object", list: "JSON array", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def unknown_key_error(source, key: str, known, where: str, prefix: str = "") -> DataError:
    """A key nobody reads: an error naming it (and the known key it looks like), never ignored."""
    close = closest(key, known, cutoff=0.6)
    hint = f"; did you mean '{close}'?" if close else ""
    return DataError(source, prefix + key, f"field '{key}' is not known{hint}",
                     f"only the known fields of {where}: {', '.join(known)}", kind="unknown_field")


def parse_turns(source, fmt: str, list_field: str, turns) -> tuple[list[dict], list[str], set[int]]:
    """(messages, the field path of each message, indices of assistant turns marked untrained)."""
    if not isinstance(turns, list):
        raise DataError(source, list_field, f"is a {type_name(turns)}", "a list of turns", kind="wrong_type")
    messages, paths, untrained = [], [], set()
    for i, turn in enumerate(turns):
        message, trained = _parse_turn(source, fmt, list_field, i, turn)
        if trained is False and message["role"] == "assistant":
            untrained.add(len(messages))
        messages.append(message)
        paths.append(f"{list_field}[{i}]")
    return messages, paths, untrained


def _parse_turn(source, fmt, list_field, i, turn) -> tuple[dict, bool | None]:
    prefix = f"{list_field}[{i}]."
    role_key, content_key, optional = _TURN_KEYS[fmt]
    if not isinstance(turn, dict):
        raise DataError(source, f"{list_field}[{i}]", f"is a {type_name(turn)}",
                        f"an object {{{role_key}, {content_key}}}", kind="wrong_type")
    known = (role_key, content_key) + optional
    for key, value in turn.items():
        if key not in known and value is not None:
            raise unknown_key_error(source, key, known, f"a {fmt} turn", prefix)
    role = _turn_str(source, turn, role_key, prefix, known)
    mapped = SHAREGPT_ROLES.get(role.lower()) if fmt == "sharegpt" else (role if role in ROLES else None)
    if mapped is None:
        valid = ", ".join(SHAREGPT_ROLES if fmt == "sharegpt" else ROLES)
        raise DataError(source, prefix + role_key, f"unknown role '{role}'", f"one of: {valid}", kind="unknown_role")
    if fmt == "sharegpt":
        message = _sharegpt_message(source, turn, mapped, prefix, known)
    else:
        message = _messages_message(source, turn, mapped, prefix, known)
    return message, _trained(source, turn, message["role"], prefix)


def _turn_str(source, turn, key, prefix, known, required=True) -> str | None:
    value = turn.get(key)
    if value is None:
        if not required:
            return None
        for k in turn:  # a misspelt key is named as such
            if k not in known and closest(k, [key], cutoff=0.6) == key:
                raise DataError(source, prefix + k, f"field '{k}' is not known; did you mean '{key}'?",
                                "a string", kind="unknown_field")
        raise DataError(source, prefix + key, "missing", "a string", kind="missing_field")
    if not isinstance(value, str):
        raise DataError(source, prefix + key, f"is a {type_name(value)}", "a string", kind="wrong_type")
    return value


def _sharegpt_message(source, turn, mapped, prefix, known) -> dict:
    value = _turn_str(source, turn, "value", prefix, known)
    if mapped != "tool_call":
        return {"role": mapped, "content": value}
    try:
        calls = json.loads(value)
    except json.JSONDecodeError as e:
        raise DataError(source, prefix + "value", f"a function_call turn whose value is not JSON ({e.msg})",
                        'the call as JSON: {"name": ..., "arguments": {...}} (or a list of them)',
                        kind="bad_tool_call") from None
    calls = calls if isinstance(calls, list) else [calls]
    return {"role": "assistant", "content": "",
            "tool_calls": [tool_call(source, f"{prefix}value[{n}]", c) for n, c in enumerate(calls)]}


def _messages_message(source, turn, role, prefix, known) -> dict:
    calls = turn.get("tool_calls")
    if calls is not None and role != "assistant":
        raise DataError(source, prefix + "tool_calls", f"on a {role} turn", "tool calls on assistant turns only",
                        kind="bad_tool_call")
    for key in ("tool_call_id", "name"):
        if turn.get(key) is not None and role != "tool":
            raise DataError(source, prefix + key, f"on a {role} turn", f"'{key}' on tool turns only",
                            kind="unknown_field")
    content = _turn_str(source, turn, "content", prefix, known, required=not calls)
    message = {"role": role, "content": content or ""}
    if calls is not None:
        if not isinstance(calls, list) or not calls:
            raise DataError(source, prefix + "tool_calls", f"is a {type_name(calls)}", "a non-empty list of calls",
                            kind="bad_tool_call")
        message["tool_calls"] = [tool_call(source, f"{prefix}tool_calls[{n}]", c) for n, c in enumerate(calls)]
    for key in ("tool_call_id", "name"):
        if turn.get(key) is not None:
            message[key] = _turn_str(source, turn, key, prefix, known)
    return message


def tool_call(source, field: str, call) -> dict:
    """One call as {"type": "function", "function": {"name", "arguments": object}} (+ its "id")."""
    fn = call.get("function", call) if isinstance(call, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or not name:
        raise DataError(source, field, f"a tool call without a name ({str(call)[:60]})",
                        '{"name": ..., "arguments": {...}} or {"type": "function", "function": {...}}',
                        kind="bad_tool_call")
    args = fn.get("arguments", fn.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise DataError(source, field + ".arguments", f"is not JSON ({e.msg})", "the arguments as a JSON object",
                            kind="bad_tool_call") from None
    if not isinstance(args, dict):
        raise DataError(source, field + ".arguments", f"is a {type_name(args)}", "a JSON object", kind="bad_tool_call")
    out = {"type": "function", "function": {"name": name, "arguments": args}}
    if isinstance(call, dict) and call.get("id") is not None:
        out["id"] = call["id"]
    return out


def parse_tools(source, value) -> list[dict] | None:
    """A record's "tools": a list of function schemas (or that list as a JSON string, as LLaMA-Factory stores
    it); None when absent or empty."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(source, "tools", f"is a string that is not JSON ({e.msg})",
                            "a list of function schemas (or that list as a JSON string)", kind="bad_tools") from None
    if not isinstance(value, list):
        raise DataError(source, "tools", f"is a {type_name(value)}", "a list of function schemas", kind="bad_tools")
    tools = []
    for n, tool in enumerate(value):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise DataError(source, f"tools[{n}]", "a tool without a name", '{"name", "description", "parameters"}',
                            kind="bad_tools")
        tools.append({"type": "function", "function": fn})
    return tools or None


def _trained(source, turn, role, prefix) -> bool | None:
    """The turn's "weight" / "train" flag: False (not trained), True, or None when it has none."""
    flags = []
    weight = turn.get("weight")
    if weight is not None:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight not in (0, 1):
            raise DataError(source, prefix + "weight", f"is {weight!r}", "0 (not trained) or 1 (trained); per-token "
                            "loss weights are not supported", kind="bad_turn_flag")
        flags.append(("weight", weight == 1))
    train = turn.get("train")
    if train is not None:
        if not isinstance(train, bool):
            raise DataError(source, prefix + "train", f"is {train!r}", "true or false", kind="bad_turn_flag")
        flags.append(("train", train))
    if not flags:
        return None
    if len({v for _, v in flags}) > 1:
        raise DataError(source, prefix + "train", "disagrees with 'weight'", "one of them, or both saying the same",
                        kind="bad_turn_flag")
    key, value = flags[0]
    if value and role != "assistant":
        raise DataError(source, prefix + key, f"asks to train a {role} turn",
                        "only assistant turns are trained (weight 0 / train false on others is accepted)",
                        kind="bad_turn_flag")
    return value


def _expected_after(prev: dict | None) -> tuple[str, ...]:
    if prev is None:
        return ("user",)
    if prev["role"] == "user":
        return ("assistant",)
    if prev["role"] == "assistant":
        return ("tool",) if prev.get("tool_calls") else ("user",)
    return ("tool", "assistant")  # after a tool result: another result, or the assistant's next turn


def check_conversation(source, messages: list[dict], paths: list[str], untrained: set[int]) -> None:
    """At most one system turn, first; then user, assistant, ..., with tool results right after the assistant
    turn that called the tools; the last turn is the assistant's; no empty answer; something left to train."""
    def named(m):
        return "tool call" if m.get("tool_calls") else m["role"]

    start = 1 if messages and messages[0]["role"] == "system" else 0
    for j in range(start, len(messages)):
        m = messages[j]
        if m["role"] == "system":
            raise DataError(source, paths[j], "a system turn after the first turn",
                            "at most one system turn, and only as the first turn", kind="bad_turn_order")
        want = _expected_after(messages[j - 1] if j > start else None)
        if m["role"] not in want:
            raise DataError(source, paths[j], f"a {named(m)} turn where a {' or '.join(want)} turn must come",
                            "user and assistant turns alternating, starting with user (after an optional system "
                            "turn), each tool call followed by its tool results", kind="bad_turn_order")
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise DataError(source, paths[-1].split("[")[0] if paths else None, "the conversation has no assistant turn",
                        "at least one user turn followed by an assistant turn", kind="no_assistant_turn")
    if roles[-1] != "assistant":
        raise DataError(source, paths[-1], f"the conversation ends with a {roles[-1]} turn",
                        "the last turn to be the assistant's answer", kind="bad_turn_order")
    for j, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip() and not m.get("tool_calls"):
            raise DataError(source, paths[j], "the assistant turn is empty", "a non-empty answer",
                            kind="empty_assistant_turn")
    if all(j in untrained for j, r in enumerate(roles) if r == "assistant"):
        raise DataError(source, paths[-1], "every assistant turn is marked weight 0 / train false",
                        "at least one trained assistant turn", kind="no_trained_turn")
