"""Chat template and loss mask: `Example` -> token ids + labels.

Labels follow the transformers convention: aligned with input_ids (the model shifts them), -100
where no loss is taken. Loss is taken on every assistant turn from the end of the generation prompt
to the end-of-turn token that closes it (eos for the built-in template, <|im_end|> for ChatML,
<|eot_id|> for Llama-3, ...), so the model learns to stop; system, user and tool turns, role markers
and bos are masked, and so are assistant turns a record marks "weight": 0 / "train": false.

Two ways to find the assistant text, both through transformers' `apply_chat_template`:
  * templates with {% generation %} tags: transformers' assistant-token mask
    (`return_assistant_tokens_mask=True`), i.e. exactly what the template marks;
  * any other template: `masks.locate_turns` (prefix rendering; see its docstring), which also handles
    thinking-model templates (a reasoning block or channel header the template writes at the start of a
    turn is supervised and reported once) and templates that are not prefix-consistent across turns.
The text is tokenized once with offsets; a token is supervised when it starts inside a span.
Rendered text is tokenized with add_special_tokens=False: the template writes bos itself, as
`apply_chat_template(tokenize=True)` assumes, so bos is never doubled.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from .errors import DataError, SkipReport, check_on_bad_record, handle
from .formats import Example
from .masks import MARK, content_spans, locate_turns, render, report_once, tok_name, unsupported_message
from .templates import BUILTIN_CHAT_TEMPLATE, ROLE_TOKENS, ChatTemplateError, template_for, uses_generation_tags

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    n_supervised: int
    truncated: bool
    source: str = ""       # the Example's source, for reports
    task: str = "default"
    index: int = -1        # position in the list given to encode_examples (-1: encoded alone)


def chat_template_of(tokenizer) -> str:
    """The template this tokenizer renders with (its own, else the built-in one)."""
    return template_for(tokenizer)


def assistant_spans(messages: list[dict], tokenizer, tools=None) -> tuple[str, list[tuple[int, int]]]:
    """(rendered text, [(start, end) character span of each assistant turn incl. its closing token])."""
    rendered = locate_turns(messages, tokenizer, tools)
    return rendered.text, [(t.start, t.end) for t in rendered.turns]


def _tokenize_with_offsets(text: str, tokenizer):
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise ChatTemplateError(f"tokenizer {tok_name(tokenizer)!r} gives no offsets mapping; load a fast "
                                "(tokenizers-backed) tokenizer, e.g. AutoTokenizer.from_pretrained(...)") from None
    return enc["input_ids"], enc["offset_mapping"]


def _prefix_mask(example: Example, tokenizer) -> tuple[list[int], list[bool]]:
    rendered = locate_turns(example.messages, tokenizer, example.tools)
    _check_tools(example, rendered.text, rendered.contents, tokenizer)
    _report(rendered, tokenizer)
    spans = [(t.start, t.end) for t in rendered.turns if t.message not in example.untrained]
    ids, offsets = _tokenize_with_offsets(rendered.text, tokenizer)
    supervised = [False] * len(ids)
    si = 0
    for i, (start, _end) in enumerate(offsets):
        while si < len(spans) and start >= spans[si][1]:
            si += 1
        if si < len(spans) and spans[si][0] <= start < spans[si][1]:
            supervised[i] = True
    if rendered.append_eos:
        ids = list(ids) + [tokenizer.eos_token_id]
        supervised.append(rendered.turns[-1].message not in example.untrained)
    return list(ids), supervised


def _generation_mask(example: Example, tokenizer) -> tuple[list[int], list[bool]]:
    """transformers' assistant-token mask of a {% generation %} template; turns marked untrained are unmasked
    run by run (the k-th run of masked tokens is the k-th assistant turn)."""
    out = tokenizer.apply_chat_template(example.messages, tools=example.tools or None,
                                        chat_template=template_for(tokenizer, example.tools), tokenize=True,
                                        return_dict=True, return_assistant_tokens_mask=True)
    text = render(tokenizer, example.messages, example.tools, False)
    _check_tools(example, text, content_spans(text, tokenizer, example.messages, example.tools), tokenizer)
    ids, mask = list(out["input_ids"]), [bool(v) for v in out["assistant_masks"]]
    if not any(mask):
        raise ChatTemplateError(f"{example.source}: the {{% generation %}} tags of the chat template of tokenizer "
                                f"{tok_name(tokenizer)!r} mark no token of this conversation; mark every "
                                "assistant turn")
    if example.untrained:
        runs = [i for i in range(len(mask)) if mask[i] and (i == 0 or not mask[i - 1])]
        assistant = [j for j, m in enumerate(example.messages) if m["role"] == "assistant"]
        if len(runs) != len(assistant):
            raise ChatTemplateError(
                f"{example.source}: the {{% generation %}} tags mark {len(runs)} stretches of text but the "
                f"conversation has {len(assistant)} assistant turns, so the turns marked \"weight\": 0 / \"train\": "
                "false cannot be told apart; use a template that marks each assistant turn once")
        for start, j in zip(runs, assistant):
            if j in example.untrained:
                i = start
                while i < len(mask) and mask[i]:
                    mask[i] = False
                    i += 1
    return ids, mask


def _report(rendered, tokenizer) -> None:
    """What the template does that a user should know, once per run."""
    name = tok_name(tokenizer)
    for t in rendered.turns:
        if t.lead:
            report_once(("lead", name, t.lead),
                        f"the chat template of tokenizer {name!r} writes {t.lead!r} at the start of assistant turns "
                        "(after the generation prompt); it is part of the supervised answer")
    if rendered.append_eos:
        report_once(("append_eos", name),
                    f"the chat template of tokenizer {name!r} does not close the last assistant turn with a control "
                    f"token: {tokenizer.eos_token} is appended to such conversations and supervised (as LLaMA-Factory "
                    "does), so the model learns to stop")
    if rendered.rewritten:
        report_once(("rewrite", name),
                    f"the chat template of tokenizer {name!r} rewrites the content of some assistant turns (e.g. drops "
                    "the reasoning of earlier turns); what it writes is what is supervised")


def tools_missing(example: Example, text: str, contents) -> str | None:
    """What of the record's tools, tool calls and tool results the rendered text lacks (None: all there). A
    template that ignores them would train on a conversation without them, silently. Names are looked for in
    the template's own text (the messages' contents cut out), results as located contents."""
    own = text
    for span in sorted((c for c in contents if c), reverse=True):
        own = own[:span[0]] + "\0" + own[span[1]:]
    for tool in example.tools or []:
        fn = tool["function"]
        needle = fn.get("description") if isinstance(fn.get("description"), str) and fn["description"] else fn["name"]
        if str(needle) not in own:  # the description, when there is one: the name may be in a tool call too
            return f"tool '{fn['name']}' of the record's tools"
    for j, m in enumerate(example.messages):
        for call in m.get("tool_calls") or []:
            if str(call["function"]["name"]) not in own:
                return f"the tool call in turn {j}"
        if m["role"] == "tool" and m["content"].strip() and contents[j] is None:
            return f"the tool result in turn {j}"
    return None


def _check_tools(example: Example, text: str, contents, tokenizer) -> None:
    missing = tools_missing(example, text, contents)
    if missing:
        raise ChatTemplateError(f"{example.source}: the chat template of tokenizer {tok_name(tokenizer)!r} does not "
                                f"render {missing}, so the model would be trained without it; pass "
                                "--chat-template builtin or chatml (both render tools), or a PATH.jinja that does")


def encode_example(example: Example, tokenizer, max_seq_len: int) -> Encoded:
    """Token ids and labels of one example, truncated to max_seq_len (the start is kept)."""
    try:
        if uses_generation_tags(template_for(tokenizer, example.tools)):
            ids, supervised = _generation_mask(example, tokenizer)
        else:
            ids, supervised = _prefix_mask(example, tokenizer)
    except ChatTemplateError:
        raise
    except Exception as e:  # jinja2 errors, raise_exception() in a template
        raise ChatTemplateError(unsupported_message(tokenizer, e, example.source)) from e
    labels = [t if s else IGNORE_INDEX for t, s in zip(ids, supervised)]
    truncated = len(ids) > max_seq_len
    ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    return Encoded(input_ids=ids, labels=labels, n_supervised=sum(l != IGNORE_INDEX for l in labels),
                   truncated=truncated, source=example.source, task=example.task)


def encode_prompt(messages: list[dict], tokenizer, tools=None) -> list[int]:
    """Token ids of the prompt for generation: the text training saw before an answer in this place, i.e. the
    conversation plus an assistant turn, cut where that turn's content starts. For most templates that is the
    add_generation_prompt=True rendering; for thinking-model templates it also holds the fixed text training
    supervised before the answer (an empty think block, a channel header), so generation starts at the answer.
    Falls back to add_generation_prompt=True when the template hides where the content goes."""
    mark = MARK.format("answer")
    try:
        answered = render(tokenizer, messages + [{"role": "assistant", "content": mark}], tools, False)
    except Exception:
        answered = ""
    if answered.count(mark) == 1:
        text = answered[:answered.index(mark)]
    else:
        text = render(tokenizer, messages, tools, True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def split_for_generation(example: Example) -> tuple[list[dict], str]:
    """(messages before the last trained assistant turn, that turn's answer as the reference)."""
    for k in range(len(example.messages) - 1, -1, -1):
        m = example.messages[k]
        if m["role"] == "assistant" and k not in example.untrained:
            return example.messages[:k], m["content"] or _calls_text(m)
    raise DataError(example.source, None, "the conversation has no trained assistant turn",
                    "an assistant turn to use as the reference", kind="no_assistant_turn")


def _calls_text(message: dict) -> str:
    import json

    return "\n".join(json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                                ensure_ascii=False) for c in message.get("tool_calls") or [])


_PROBES = (
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
      {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ok"}], None),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 3"},
      {"role": "assistant", "content": "", "tool_calls": [
          {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
      {"role": "tool", "content": "5"}, {"role": "assistant", "content": "5"}],
     [{"type": "function", "function": {"name": "add", "description": "add two numbers", "parameters": {
         "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}}]),
)


def stop_token_ids(tokenizer) -> list[int]:
    """Every token that ends an assistant turn under the tokenizer's chat template, eos first: what generation
    must stop on (evaluation, the exported generation_config.json). Found by rendering two small conversations
    (a multi-turn one and a tool-calling one, when the template renders tools) through the mask builder."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    for messages, tools in _PROBES:
        try:
            rendered = locate_turns(messages, tokenizer, tools)
        except Exception:  # a template without tool support: the plain conversation still counts
            continue
        if tools and tools_missing(Example(messages=messages, tools=tools), rendered.text, rendered.contents):
            continue
        for turn in rendered.turns:
            if turn.closing is not None:
                tid = tokenizer.convert_tokens_to_ids(turn.closing)
                if isinstance(tid, int) and tid not in ids and tid != tokenizer.unk_token_id:
                    ids.append(tid)
    return ids


def no_answer_left(source: str, max_seq_len: int) -> DataError:
    """The error of an example whose prompt fills max_seq_len, leaving no supervised token."""
    return DataError(source, "messages", f"no assistant token is left after truncation to max_seq_len={max_seq_len} "
                     "(the prompt fills it)", "a longer --max-seq-len or a shorter conversation",
                     kind="no_supervised_tokens")


def log_truncation(max_seq_len: int, n_truncated: int, n: int, n_empty: int) -> None:
    """One warning for the truncated (kept) and emptied (skipped) examples, when there are any."""
    if n_truncated or n_empty:
        logger.warning("max_seq_len=%d: %d of %d examples truncated (kept), %d skipped with no answer token left",
                       max_seq_len, n_truncated, n, n_empty)


def encode_examples(examples: list[Example], tokenizer, max_seq_len: int, on_bad_record: str = "error",
                    report: SkipReport | None = None) -> list[Encoded | None]:
    """Encode every example; the result is aligned with `examples`, None where one was skipped.

    Truncated examples that keep at least one supervised token are kept and counted in
    `report.events["truncated"]`. An example left with no supervised token (its prompt alone
    fills max_seq_len) raises a DataError, or with on_bad_record="skip" becomes None and is
    recorded in the report. If no example is usable a DataError is raised either way.
    """
    check_on_bad_record(on_bad_record)
    report = report if report is not None else SkipReport()
    out: list[Encoded | None] = []
    n_truncated = n_empty = 0
    for i, ex in enumerate(examples):
        enc = encode_example(ex, tokenizer, max_seq_len)
        enc.index = i
        if enc.n_supervised == 0:
            handle(no_answer_left(ex.source, max_seq_len), on_bad_record, report)
            n_empty += 1
            out.append(None)
            continue
        if enc.truncated:
            report.note("truncated")
            n_truncated += 1
        out.append(enc)
    log_truncation(max_seq_len, n_truncated, len(examples), n_empty)
    if examples and all(e is None for e in out):
        raise DataError(examples[0].source.rsplit(":", 1)[0], None,
                        f"no example has a supervised token within max_seq_len={max_seq_len}",
                        "a longer --max-seq-len", kind="no_records", skippable=False)
    return out


__all__ = ["BUILTIN_CHAT_TEMPLATE", "IGNORE_INDEX", "ChatTemplateError", "Encoded", "assistant_spans",
           "chat_template_of", "encode_example", "encode_examples", "encode_prompt", "ROLE_TOKENS",
           "split_for_generation", "stop_token_ids"]
