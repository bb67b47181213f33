"""A record's identity that survives reordering and filtering of its file: a hash of its conversation.

    key = record_hash(example.messages, example.tools, example.untrained)     # 16 hex characters

Per-record values computed once (reference losses, launch/reference.py) are keyed by it, so a training
file that was shuffled, filtered or concatenated with others still finds them. Exact duplicates share a key
(their conversation is the same, so is any value computed from it).

What changes the loss changes the key: besides each turn's role and content, a turn's tool calls (and tool
call id / name), the record's tools and the assistant turns marked untrained (weight 0 / train false). A
plain conversation without any of these hashes exactly as it always has, so reference losses written before
tools and per-turn flags were read still match.
"""
from __future__ import annotations

import hashlib
import json

_EXTRA_KEYS = ("tool_calls", "tool_call_id", "name")


def record_hash(messages: list[dict], tools: list[dict] | None = None, untrained=()) -> str:
    """sha256 over the canonical JSON of the conversation (role and content of each turn, in order; a turn's
    tool calls / id / name after them, and the record's tools and untrained turns at the end, only when
    present), first 16 hex digits: 64 bits, so among a million distinct records the chance of any collision
    is ~3e-8."""
    turns = []
    for m in messages:
        turn = [m["role"], m["content"]]
        extra = {k: m[k] for k in _EXTRA_KEYS if m.get(k) is not None}
        if extra:
            turn.append(extra)
        turns.append(turn)
    payload: list = turns
    if tools or untrained:
        payload = [turns, {"tools": tools or [], "untrained": sorted(untrained)}]
    canonical = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def example_hash(example) -> str:
    """record_hash of a data.Example: its messages, tools and untrained turns."""
    return record_hash(example.messages, example.tools, example.untrained)
