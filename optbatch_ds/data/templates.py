"""Chat templates: the built-in one, ChatML, and which one a run uses (`--chat-template`).

    template = resolve_chat_template("tokenizer", tokenizer)      # or "builtin", "chatml", "my_template.jinja"
    tokenizer.chat_template = template                           # modeling.load_tokenizer does this once

The template a run trains with is set on the tokenizer, so everything after (loss masks, evaluation
prompts, the export in final/) uses the same one. Rendering always goes through transformers'
`apply_chat_template`, with the record's `tools` passed to it.
"""
from __future__ import annotations

import os
import re

from optbatch_ds.errors import ConfigError, UserError, nearest_name

# The built-in template, used when the tokenizer has none. One control token per role, no newlines
# (a SentencePiece tokenizer would spend a byte token on each), bos once at the start, eos after every
# assistant turn. With add_generation_prompt the text ends in "<|assistant|>".
#   <s><|system|>Be brief.<|user|>Hi, I am Tom.<|assistant|>Hello Tom.</s><|user|>Who am I?<|assistant|>You are Tom.</s>
# Tools (only when a record has them): the tool list as JSON in a system turn of its own, each call of an
# assistant turn as <tool_call>{"name": ..., "arguments": ...}</tool_call> after its content, each tool
# result as a user turn <|user|><tool_response>...</tool_response> (as Qwen's templates do). Without tools
# the text is exactly what it was before tools existed, so the masks of plain conversations never change.
BUILTIN_CHAT_TEMPLATE = (
    "{%- if bos_token %}{{ bos_token }}{% endif %}"
    "{%- if tools %}{{ '<|system|>Tools: ' + tools|tojson }}{% endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{ '<|system|>' + message['content'] }}"
    "{%- elif message['role'] == 'user' %}{{ '<|user|>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}{{ '<|assistant|>' + message['content'] }}"
    "{%- for call in (message.tool_calls or []) %}"
    "{{ '<tool_call>' + {'name': call['function']['name'], 'arguments': call['function']['arguments']}|tojson"
    " + '</tool_call>' }}"
    "{%- endfor %}"
    "{%- if eos_token %}{{ eos_token }}{% endif %}"
    "{%- elif message['role'] == 'tool' %}{{ '<|user|><tool_response>' + message['content'] + '</tool_response>' }}"
    "{%- else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# ChatML (`--chat-template chatml`), with tools the way Qwen2.5 writes them: the tool list in the system
# turn, calls as <tool_call> blocks in the assistant turn, results as <tool_response> in a user turn.
CHATML_CHAT_TEMPLATE = (
    "{%- set ns = namespace(system=none) %}"
    "{%- if messages and messages[0]['role'] == 'system' %}{% set ns.system = messages[0]['content'] %}{% endif %}"
    "{%- if tools %}"
    "{{ '<|im_start|>system\\n' }}{% if ns.system %}{{ ns.system + '\\n\\n' }}{% endif %}"
    "{{ 'Tools you can call, one JSON object per line:\\n<tools>\\n' }}"
    "{%- for tool in tools %}{{ tool|tojson + '\\n' }}{% endfor %}"
    "{{ '</tools>\\nCall one with <tool_call>\\n{\"name\": ..., \"arguments\": ...}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif ns.system is not none %}{{ '<|im_start|>system\\n' + ns.system + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}"
    "{%- elif message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' + message['content'] }}"
    "{%- for call in (message.tool_calls or []) %}"
    "{%- if message['content'] or not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<tool_call>\\n' + {'name': call['function']['name'], 'arguments': call['function']['arguments']}|tojson"
    " + '\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{ '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")

CHAT_TEMPLATE_CHOICES = ("tokenizer", "builtin", "chatml")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class ChatTemplateError(UserError):
    """The chat template cannot be used to build a loss mask (or cannot be loaded)."""


def uses_generation_tags(template: str) -> bool:
    """Whether the template marks assistant text with {% generation %} (transformers' assistant-token mask)."""
    return bool(_GENERATION_TAG.search(template or ""))


def template_for(tokenizer, tools=None) -> str:
    """The template string that renders for this tokenizer: its own (the "tool_use" one of a named set when
    there are tools, as transformers picks), else the built-in one."""
    own = getattr(tokenizer, "chat_template", None)
    if not own:
        return BUILTIN_CHAT_TEMPLATE
    if isinstance(own, dict):
        if tools and "tool_use" in own:
            return own["tool_use"]
        return own.get("default") or next(iter(own.values()))
    return own


def tokens_of(tokenizer) -> set[str]:
    """Every token string the tokenizer treats as one control token: its special and added tokens."""
    tokens = set(getattr(tokenizer, "all_special_tokens", []) or [])
    tokens.update((tokenizer.get_added_vocab() or {}).keys())
    return {t for t in tokens if t}


def resolve_chat_template(choice: str, tokenizer, where: str = "") -> tuple[str, str]:
    """(template, how it was chosen) for `--chat-template` = tokenizer | builtin | chatml | PATH (a Jinja file).

    "tokenizer" keeps the tokenizer's own template, or the built-in one when it has none (a base model).
    "chatml" needs <|im_start|> and <|im_end|> to be tokens of the tokenizer (else the turns could not be
    told apart from text, and the model could not learn to stop): a ConfigError says what to pass instead."""
    name = where or getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if choice == "tokenizer":
        own = getattr(tokenizer, "chat_template", None)
        if own:
            return own, f"the tokenizer's own chat template ({name})"
        return BUILTIN_CHAT_TEMPLATE, (f"the built-in chat template: the tokenizer at {name} has none (a base "
                                       "model); it is saved with the export in final/")
    if choice == "builtin":
        return BUILTIN_CHAT_TEMPLATE, "the built-in chat template (--chat-template builtin)"
    if choice == "chatml":
        missing = [t for t in CHATML_TOKENS if t not in tokens_of(tokenizer)]
        if missing:
            raise ConfigError(f"--chat-template chatml: the tokenizer at {name} has no {' / '.join(missing)} token, so "
                              "ChatML turns would be plain text and the model could not learn to stop; use "
                              "--chat-template builtin (closes turns with eos), or a model whose tokenizer has them")
        return CHATML_CHAT_TEMPLATE, "ChatML (--chat-template chatml)"
    return _template_file(choice), f"the chat template in {choice} (--chat-template)"


def check_choice(choice: str) -> None:
    """`--chat-template` names one of CHAT_TEMPLATE_CHOICES or an existing file; else a ConfigError (raised when the
    flags are parsed, before anything is loaded)."""
    if choice not in CHAT_TEMPLATE_CHOICES and not os.path.isfile(choice):
        hint = nearest_name(choice, CHAT_TEMPLATE_CHOICES) if not choice.endswith(".jinja") else ""
        raise ConfigError(f"--chat-template {choice}: not one of {', '.join(CHAT_TEMPLATE_CHOICES)} and no such file "
                          f"(a Jinja chat template, e.g. my_template.jinja){hint}")


def _template_file(path: str) -> str:
    check_choice(path)
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--chat-template {path}: cannot read it as UTF-8 text ({e})") from None
    if not text.strip():
        raise ConfigError(f"--chat-template {path}: the file is empty")
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        _compile_jinja_template(text)
    except ImportError:
        pass
    except Exception as e:  # jinja2.TemplateSyntaxError and friends
        line = getattr(e, "lineno", None)
        raise ConfigError(f"--chat-template {path}{f':{line}' if line else ''}: not a valid Jinja template "
                          f"({type(e).__name__}: {e})") from None
    return text
