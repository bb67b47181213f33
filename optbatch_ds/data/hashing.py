"""A record's identity that survives reordering and filtering of its file: a hash of its conversation.

    key = record_hash(example.messages)     # 16 hex characters

Per-record values computed once (reference losses, launch/reference.py) are keyed by it, so a training
file that was shuffled, filtered or concatenated with others still finds them. Exact duplicates share a key
(their conversation is the same, so is any value computed from it).
"""
from __future__ import annotations

import hashlib
import json


def record_hash(messages: list[dict]) -> str:
    """sha256 over the canonical JSON of the conversation (role and content of each turn, in order), first 16
    hex digits: 64 bits, so among a million distinct records the chance of any collision is ~3e-8."""
    canonical = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
