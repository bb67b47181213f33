"""Chat template and loss mask: `Example` -> token ids + labels.

Labels follow the transformers convention: aligned with input_ids (the model shifts them), -100
where no loss is taken. Loss is taken on every assistant turn's content plus the end-of-turn
token that closes it (eos for the built-in template, e.g. <|im_end|> for ChatML), so the model
learns to stop; system and user turns, role markers and bos are masked.

How the mask is found, for any prefix-consistent template: render the whole conversation once;
for assistant turn k, render messages[:k] with add_generation_prompt=True (the prompt the model
sees at generation time) and messages[:k+1]; both must be prefixes of the whole text. The turn's
span runs from the end of the prompt to the end of the first control token after its content.
The text is tokenized once with offsets; a token is supervised when it starts inside a span.
Rendered text is tokenized with add_special_tokens=False: the template writes bos itself, as
`apply_chat_template(tokenize=True)` assumes, so bos is never doubled.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from optbatch_ds.errors import UserError

from .errors import DataError, SkipReport, check_on_bad_record, handle
from .formats import Example

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

# The built-in template, used when the tokenizer has none. One control token per role, no
# newlines (a SentencePiece tokenizer would spend a byte token on each), bos once at the start,
# eos after every assistant turn. With add_generation_prompt the text ends in "<|assistant|>".
#   <s><|system|>Be brief.<|user|>Hi, I am Tom.<|assistant|>Hello Tom.</s><|user|>Who am I?<|assistant|>You are Tom.</s>
BUILTIN_CHAT_TEMPLATE = (
    "{%- if bos_token %}{{ bos_token }}{% endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{ '<|system|>' + message['content'] }}"
    "{%- elif message['role'] == 'user' %}{{ '<|user|>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}{{ '<|assistant|>' + message['content'] }}"
    "{%- if eos_token %}{{ eos_token }}{% endif %}"
    "{%- else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")


class ChatTemplateError(UserError):
    """The tokenizer's chat template cannot be used to build a loss mask."""


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
    return getattr(tokenizer, "chat_template", None) or BUILTIN_CHAT_TEMPLATE


def _render(messages, tokenizer, template: str, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def _tok_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def _control_tokens(tokenizer) -> list[str]:
    tokens = set(getattr(tokenizer, "all_special_tokens", []) or [])
    tokens.update((tokenizer.get_added_vocab() or {}).keys())
    # Longest first so "<|im_end|>" wins over a shorter token that is its prefix.
    return sorted((t for t in tokens if t), key=len, reverse=True)


def assistant_spans(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """(rendered text, [(start, end) character span of each assistant turn incl. its closing token])."""
    template = chat_template_of(tokenizer)
    full = _render(messages, tokenizer, template, False)
    controls = _control_tokens(tokenizer)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _render(messages[:k], tokenizer, template, True)
        upto = _render(messages[: k + 1], tokenizer, template, False)
        if not (full.startswith(upto) and upto.startswith(prompt)):
            raise ChatTemplateError(
                f"the chat template of tokenizer {_tok_name(tokenizer)!r} is not prefix-consistent: rendering "
                f"the first {k} messages with add_generation_prompt=True (and the first {k + 1}) does not give "
                "a prefix of the whole conversation, so assistant turns cannot be located for the loss mask. "
                "Set a prefix-consistent template on the tokenizer (tokenizer.chat_template = ...) "
                "or remove it to use the built-in one.")
        rest = upto[len(prompt):]
        content = m["content"]
        at = rest.find(content)
        if at < 0 and content.strip():
            content = content.strip()  # templates that trim message content
            at = rest.find(content)
        if at < 0 or rest[:at].strip():
            raise ChatTemplateError(
                f"the chat template of tokenizer {_tok_name(tokenizer)!r} does not put assistant turn {k} right "
                f"after the generation prompt (text between them: {rest[:max(at, 0)][:60]!r}); does the "
                "template support add_generation_prompt?")
        content_end = len(prompt) + at + len(content)
        suffix = upto[content_end:]
        hits = [(suffix.find(t), t) for t in controls if t in suffix]
        if not hits:
            raise ChatTemplateError(
                f"the chat template of tokenizer {_tok_name(tokenizer)!r} closes assistant turns with no "
                f"control token (found {suffix[:40]!r} after the answer), so the model could not learn to "
                "stop; the built-in template closes them with eos_token (is eos_token set?)")
        pos, tok = min(hits, key=lambda h: (h[0], -len(h[1])))
        spans.append((len(prompt), content_end + pos + len(tok)))
    return full, spans


def _tokenize_with_offsets(text: str, tokenizer):
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise ChatTemplateError(f"tokenizer {_tok_name(tokenizer)!r} gives no offsets mapping; load a fast "
                                "(tokenizers-backed) tokenizer, e.g. AutoTokenizer.from_pretrained(...)") from None
    return enc["input_ids"], enc["offset_mapping"]


def encode_example(example: Example, tokenizer, max_seq_len: int) -> Encoded:
    """Token ids and labels of one example, truncated to max_seq_len (the start is kept)."""
    try:
        text, spans = assistant_spans(example.messages, tokenizer)
    except ChatTemplateError:
        raise
    except Exception as e:  # jinja2 errors, raise_exception() in a template
        raise ChatTemplateError(f"{example.source}: the chat template of tokenizer {_tok_name(tokenizer)!r} "
                                f"failed on this conversation ({type(e).__name__}: {e})") from e
    ids, offsets = _tokenize_with_offsets(text, tokenizer)
    labels = [IGNORE_INDEX] * len(ids)
    si = 0
    for t, (start, _end) in enumerate(offsets):
        while si < len(spans) and start >= spans[si][1]:
            si += 1
        if si < len(spans) and spans[si][0] <= start < spans[si][1]:
            labels[t] = ids[t]
    truncated = len(ids) > max_seq_len
    ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    return Encoded(input_ids=ids, labels=labels, n_supervised=sum(l != IGNORE_INDEX for l in labels),
                   truncated=truncated, source=example.source, task=example.task)


def encode_prompt(messages: list[dict], tokenizer) -> list[int]:
    """Token ids of the prompt for generation: messages rendered with add_generation_prompt=True."""
    text = _render(messages, tokenizer, chat_template_of(tokenizer), True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def split_for_generation(example: Example) -> tuple[list[dict], str]:
    """(messages before the last assistant turn, that turn's content as the reference answer)."""
    for k in range(len(example.messages) - 1, -1, -1):
        if example.messages[k]["role"] == "assistant":
            return example.messages[:k], example.messages[k]["content"]
    raise DataError(example.source, None, "the conversation has no assistant turn",
                    "an assistant turn to use as the reference", kind="no_assistant_turn")


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
            handle(DataError(ex.source, "messages", f"no assistant token is left after truncation to "
                             f"max_seq_len={max_seq_len} (the prompt fills it)",
                             "a longer --max-seq-len or a shorter conversation", kind="no_supervised_tokens"),
                   on_bad_record, report)
            n_empty += 1
            out.append(None)
            continue
        if enc.truncated:
            report.note("truncated")
            n_truncated += 1
        out.append(enc)
    if n_truncated or n_empty:
        logger.warning("max_seq_len=%d: %d of %d examples truncated (kept), %d skipped with no answer token left",
                       max_seq_len, n_truncated, len(examples), n_empty)
    if examples and all(e is None for e in out):
        raise DataError(examples[0].source.rsplit(":", 1)[0], None,
                        f"no example has a supervised token within max_seq_len={max_seq_len}",
                        "a longer --max-seq-len", kind="no_records", skippable=False)
    return out
