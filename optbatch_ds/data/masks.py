"""Where each assistant turn lies in a rendered conversation: the character spans the loss mask covers.

For templates without {% generation %} tags (those go through transformers' assistant-token mask, in
chat.py). The conversation is rendered once, whole, as it is trained on. For assistant turn k:

  * start: where the generation prompt ends. messages[:k] is rendered with add_generation_prompt=True;
    the whole text must agree with that prompt through its history (else the template is not usable:
    ChatTemplateError). The turn starts where the two part, or at the end of the prompt. This is what
    makes thinking-model and multi-turn templates work: Qwen3-style templates write an empty reasoning
    block only into the last turn, phi-3-style ones end a conversation (not a prompt) with eos.
  * content: found exactly by rendering the conversation once more with every message's content replaced
    by a marker (falls back to a search in order when the template rewrites content).
  * the template's own text between the prompt and the content (an empty think block, a channel header,
    a newline) belongs to the turn: the model must write it at generation time, so it is supervised and
    reported once per run.
  * end: the first control token after the content (after the tool calls of a tool-calling turn) and
    before the next message: <|im_end|>, <|eot_id|>, eos, or the next turn's role token for templates
    whose turns have no closing token (GLM-style, whose generation also stops on <|user|>). When the last
    turn has none, eos is appended to the sequence and supervised, as LLaMA-Factory does for such
    templates; a middle turn without one is a ChatTemplateError.
"""
from __future__ import annotations

import functools
import json
import logging
import re
import weakref
from dataclasses import dataclass

from .templates import ChatTemplateError, template_for, tokens_of

logger = logging.getLogger(__name__)

MARK = "OPTBATCHMARK{}Q"  # replaces content to find where the template puts it
_reported: set = set()


@dataclass
class TurnSpan:
    """One assistant turn in the rendered text: [start, end) is supervised."""

    message: int         # index of the turn in the messages
    start: int           # end of the generation prompt
    content_start: int   # where the turn's content starts (start + len(lead))
    end: int             # end of the closing token (content end + its text when eos is appended)
    lead: str            # template text between the generation prompt and the content
    closing: str | None  # the closing token; None when eos is appended after the text


@dataclass
class Rendered:
    text: str
    turns: list[TurnSpan]
    append_eos: bool     # the last turn has no closing token: eos goes after the text (and is supervised)
    contents: list       # (start, end) of each message's content in `text`, None where not found
    rewritten: bool = False  # some assistant content is not in the text as written (the template rewrites it)


def tok_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def render(tokenizer, messages, tools, add_generation_prompt: bool) -> str:
    """The conversation as text, through transformers' apply_chat_template."""
    return tokenizer.apply_chat_template(messages, tools=tools or None, chat_template=template_for(tokenizer, tools),
                                         tokenize=False, add_generation_prompt=add_generation_prompt)


def common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix of two strings (a binary search over slice comparisons, done in C)."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while lo < hi:  # a[:lo] == b[:lo] and a[:hi + 1] != b[:hi + 1]
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def report_once(key, message: str) -> None:
    """Log `message` once per process (per run): template facts, not per-record events."""
    if key not in _reported:
        _reported.add(key)
        logger.warning(message)


# ---------------------------------------------------------------------------- content spans

def content_spans(full: str, tokenizer, messages, tools) -> list[tuple[int, int] | None]:
    """(start, end) in `full` of every message's rendered content; None where it is empty or not found."""
    marks = {j: MARK.format(j) for j, m in enumerate(messages)
             if isinstance(m.get("content"), str) and m["content"].strip()}
    marked = [{**m, "content": marks[j]} if j in marks else m for j, m in enumerate(messages)]
    try:
        text = render(tokenizer, marked, tools, False)
    except Exception:  # a template that inspects content (and rejects the marker): search instead
        text = None
    spans = _map_marks(full, text, messages, marks) if text is not None else None
    return spans if spans is not None else _search_contents(full, messages)


def _map_marks(full: str, text: str, messages, marks: dict) -> list | None:
    """Spans from the marked rendering: `full` must be `text` with each marker replaced by its content
    (as written, or trimmed); None when it is not (the template rewrites content)."""
    order = list(marks)
    if any(text.count(marks[j]) != 1 for j in order) or order != sorted(order, key=lambda j: text.index(marks[j])):
        return None
    spans: list = [None] * len(messages)
    pos_t = pos_f = 0
    for n, j in enumerate(order):
        at = text.index(marks[j], pos_t)
        if not full.startswith(text[pos_t:at], pos_f):
            return None
        pos_f += at - pos_t
        pos_t = at + len(marks[j])
        following = text[pos_t:text.index(marks[order[n + 1]]) if n + 1 < len(order) else len(text)]
        content = messages[j]["content"]
        for cand in dict.fromkeys((content, content.strip(), content.rstrip(), content.lstrip())):
            if full.startswith(cand, pos_f) and full.startswith(following, pos_f + len(cand)):
                spans[j] = (pos_f, pos_f + len(cand))
                pos_f += len(cand)
                break
        else:
            return None
    return spans if full[pos_f:] == text[pos_t:] else None


def _search_contents(full: str, messages) -> list:
    spans: list = [None] * len(messages)
    cursor = 0
    for j, m in enumerate(messages):
        content = m.get("content")
        if not isinstance(content, str) or not content.strip():
            continue
        for cand in dict.fromkeys((content, content.strip())):
            at = full.find(cand, cursor)
            if at >= 0:
                spans[j] = (at, at + len(cand))
                cursor = at + len(cand)
                break
    return spans


# ---------------------------------------------------------------------------- turns

def locate_turns(messages: list[dict], tokenizer, tools=None) -> Rendered:
    """The rendered conversation and the span of every assistant turn (see the module docstring)."""
    full = render(tokenizer, messages, tools, False)
    contents = content_spans(full, tokenizer, messages, tools)
    specials, added = _control_patterns(tokenizer)
    out = Rendered(full, [], False, contents)
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start, content_start = _turn_start(full, tokenizer, messages, tools, k, contents[k], (specials, added))
        if out.turns and start < out.turns[-1].end:
            raise ChatTemplateError(f"the chat template of tokenizer {tok_name(tokenizer)!r} renders assistant turn "
                                    f"{k} inside the previous one; use --chat-template chatml, builtin or a PATH.jinja")
        out.rewritten |= contents[k] is None and bool(m["content"].strip())
        anchor = contents[k][1] if contents[k] else content_start
        if m.get("tool_calls"):
            anchor = _tool_calls_end(full, anchor, m["tool_calls"])
        limit = next((c[0] for c in contents[k + 1:] if c), len(full))
        hit = _first_control(full, anchor, limit, specials) or _first_control(full, anchor, limit, added)
        if hit is None:
            if k != len(messages) - 1:
                raise ChatTemplateError(
                    f"the chat template of tokenizer {tok_name(tokenizer)!r} closes assistant turns with no control "
                    f"token (found {full[anchor:limit][:40]!r} after turn {k}), so the model could not learn to "
                    "stop; use --chat-template builtin (closes turns with eos), chatml, or a PATH.jinja")
            out.append_eos = _check_eos(tokenizer)
            out.turns.append(TurnSpan(k, start, content_start, len(full), full[start:content_start], None))
            continue
        pos, token = hit
        out.turns.append(TurnSpan(k, start, content_start, pos + len(token), full[start:content_start], token))
    return out


def _turn_start(full: str, tokenizer, messages, tools, k: int, content, patterns) -> tuple[int, int]:
    """(start of the supervised text, start of the content) of assistant turn k in `full`."""
    prompt = render(tokenizer, messages[:k], tools, True)
    history = common_prefix(prompt, render(tokenizer, messages[:k], tools, False))
    agree = common_prefix(prompt, full)
    # Where prompt and turn part inside a control token ("<think>" against "<tool_call>": they share "<t"), the
    # turn starts at that token.
    agree = min(_token_start(full, agree, patterns), _token_start(prompt, agree, patterns))
    if agree < history or (content is not None and content[0] < history):
        raise ChatTemplateError(
            f"the chat template of tokenizer {tok_name(tokenizer)!r} is not prefix-consistent: rendering the first "
            f"{k} messages with add_generation_prompt=True does not give a prefix of the whole conversation (they "
            f"part at {full[agree:agree + 30]!r}), so assistant turn {k} cannot be located for the loss mask. Pass "
            "--chat-template chatml, builtin or a PATH.jinja with a prefix-consistent template")
    if history >= len(prompt):
        raise ChatTemplateError(
            f"the chat template of tokenizer {tok_name(tokenizer)!r} writes nothing for add_generation_prompt=True, "
            "so the start of an assistant turn cannot be told apart from the prompt; use a template that supports "
            "it (--chat-template chatml, builtin or a PATH.jinja)")
    if content is None:
        return agree, agree
    return min(agree, content[0]), content[0]


def _tool_calls_end(full: str, start: int, calls) -> int:
    """Where the rendered tool calls of a turn end: after each call's arguments (as the template's tojson
    writes them) or, failing that, its name; `start` when none is found."""
    end = start
    for call in calls:
        fn = call.get("function", call)
        args = fn.get("arguments")
        if isinstance(args, str):
            texts = [args]
        else:
            texts = [json.dumps(args, ensure_ascii=False), json.dumps(args),
                     json.dumps(args, ensure_ascii=False, separators=(",", ":")), json.dumps(args, indent=2)]
        texts.append(str(fn.get("name", "")))
        for t in texts:
            at = full.find(t, end) if t else -1
            if at >= 0:
                end = at + len(t)
                break
    return end


@functools.lru_cache(maxsize=32)
def _pattern(tokens: tuple[str, ...]):
    return re.compile("|".join(re.escape(t) for t in tokens)) if tokens else None


_patterns_cache: dict = {}


def _control_patterns(tokenizer):
    """(special tokens, other added tokens) as regexes, longest first so <|im_end|> beats a prefix of it.
    Closing tokens are looked for among the special ones first: added tokens such as Qwen's <tool_call> or
    <think> are text the model writes inside a turn, not its end. Cached per tokenizer object and vocabulary size
    (a weak reference checks that the object is still the one cached: a new tokenizer can reuse a freed id)."""
    key = (id(tokenizer), len(tokenizer))
    hit = _patterns_cache.get(key)
    if hit is not None and hit[0]() is tokenizer:
        return hit[1]
    try:
        ref = weakref.ref(tokenizer)
    except TypeError:  # not weak-referenceable: compute every time
        ref = None
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values():
        if getattr(tok, "special", False):
            special.add(str(tok))
    added = tokens_of(tokenizer) - special
    order = lambda t: (-len(t), t)  # noqa: E731
    patterns = (_pattern(tuple(sorted((t for t in special if t), key=order))),
                _pattern(tuple(sorted((t for t in added if t), key=order))))
    if ref is not None:
        _patterns_cache[key] = (ref, patterns)
    return patterns


def _token_start(text: str, pos: int, patterns) -> int:
    """The start of the control token that `pos` falls strictly inside, else `pos`."""
    for pattern in patterns:
        if pattern is None:
            continue
        for m in pattern.finditer(text, max(0, pos - 64), min(len(text), pos + 64)):
            if m.start() < pos < m.end():
                return m.start()
    return pos


def _first_control(text: str, start: int, limit: int, pattern) -> tuple[int, str] | None:
    if pattern is None or start > limit:
        return None
    m = pattern.search(text, start, limit)
    return (m.start(), m.group(0)) if m else None


def _check_eos(tokenizer) -> bool:
    if getattr(tokenizer, "eos_token", None) is None or getattr(tokenizer, "eos_token_id", None) is None:
        raise ChatTemplateError(
            f"the chat template of tokenizer {tok_name(tokenizer)!r} does not close the last assistant turn with a "
            "control token and the tokenizer has no eos token to close it with, so the model could not learn to "
            "stop; use --chat-template chatml or a PATH.jinja whose turns end in a control token")
    return True


def unsupported_message(tokenizer, exc: Exception, source: str) -> str:
    """The message of a template that failed on one conversation (jinja error, raise_exception)."""
    return (f"{source}: the chat template of tokenizer {tok_name(tokenizer)!r} failed on this conversation "
            f"({type(exc).__name__}: {exc}); fix the record, or use a template that renders it "
            "(--chat-template chatml, builtin or a PATH.jinja)")
