"""Loss masks from every template family users bring, tools, per-turn flags, stop tokens, --chat-template.

    python -m pytest tests/unit/test_chat_templates.py -q

The templates and tokenizers are written in tests/chat_families.py (character-level tokenizers holding each
family's control tokens), so each assertion is the exact supervised text.
"""
import pytest

from optbatch_ds.data import (BUILTIN_CHAT_TEMPLATE, CHATML_CHAT_TEMPLATE, ChatTemplateError, Example,
                              encode_example, encode_prompt, resolve_chat_template, split_for_generation,
                              stop_token_ids)
from optbatch_ds.errors import ConfigError
from tests.chat_families import FAMILIES, char_tokenizer, family_tokenizer, supervised_texts

pytestmark = pytest.mark.unit

SINGLE = [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]
MULTI = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi, I am Tom."},
         {"role": "assistant", "content": "Hello Tom."}, {"role": "user", "content": "Who am I?"},
         {"role": "assistant", "content": "You are Tom."}]
CALL = {"type": "function", "function": {"name": "discount", "arguments": {"price": 40, "pct": 25}}}
TOOL_CONV = [{"role": "user", "content": "What will a 40 dollar lamp cost after a 25 percent discount?"},
             {"role": "assistant", "content": "", "tool_calls": [CALL]},
             {"role": "tool", "content": '{"price": 30}'},
             {"role": "assistant", "content": "The lamp will cost 30 dollars."}]
TOOLS = [{"type": "function", "function": {"name": "discount", "description": "apply a percentage discount"}}]
ARGS = '{"price": 40, "pct": 25}'

# family: (close of a middle turn, close of the last turn, text the template writes before every answer,
#          ... before the answer of the last turn only)
CLOSES = {
    "chatml": ("<|im_end|>", "<|im_end|>", "", ""),
    "chatml_gen": ("<|im_end|>", "<|im_end|>", "", ""),
    "llama3": ("<|eot_id|>", "<|eot_id|>", "", ""),
    "phi3": ("<|end|>", "<|end|>", "", ""),
    "qwen3": ("<|im_end|>", "<|im_end|>", "", "<think>\n\n</think>\n\n"),
    "qwen3_nothink": ("<|im_end|>", "<|im_end|>", "", ""),
    "gptoss": ("<|end|>", "<|return|>", "<|channel|>final<|message|>", ""),
    "glm": ("<|user|>", "<|endoftext|>", "\n<think></think>\n", ""),
    "deepseek": ("<｜end▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "", ""),
}


def _texts(tok, messages, tools=None, untrained=()):
    enc = encode_example(Example(messages=messages, tools=tools, untrained=frozenset(untrained)), tok, 4096)
    return supervised_texts(enc, tok)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_single_and_multi_turn_masks(family):
    tok = family_tokenizer(family)
    mid, last, lead, last_lead = CLOSES[family]
    assert _texts(tok, SINGLE) == [lead + last_lead + "5" + last]
    assert _texts(tok, MULTI) == [lead + "Hello Tom." + mid, lead + last_lead + "You are Tom." + last]
    # The system turn, the user turns and the role headers are never supervised.
    assert not any("Be brief" in t or "Who am I" in t for t in _texts(tok, MULTI))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_turn_marked_untrained_is_in_the_text_not_the_loss(family):
    tok = family_tokenizer(family)
    mid, last, lead, last_lead = CLOSES[family]
    assert _texts(tok, MULTI, untrained={2}) == [lead + last_lead + "You are Tom." + last]
    enc = encode_example(Example(messages=MULTI, untrained=frozenset({2})), tok, 4096)
    assert "Hello Tom." in tok.decode(enc.input_ids)


@pytest.mark.parametrize("family,expected", [
    ("chatml", [f'<tool_call>\n{{"name": "discount", "arguments": {ARGS}}}\n</tool_call><|im_end|>',
                "The lamp will cost 30 dollars.<|im_end|>"]),
    ("qwen3", [f'<think>\n\n</think>\n\n<tool_call>\n{{"name": "discount", "arguments": {ARGS}}}\n</tool_call>'
               "<|im_end|>", "<think>\n\n</think>\n\nThe lamp will cost 30 dollars.<|im_end|>"]),
    ("qwen3_nothink", [f'<tool_call>\n{{"name": "discount", "arguments": {ARGS}}}\n</tool_call><|im_end|>',
                       "The lamp will cost 30 dollars.<|im_end|>"]),
    ("llama3", [f'{{"name": "discount", "parameters": {ARGS}}}<|eot_id|>',
                "The lamp will cost 30 dollars.<|eot_id|>"]),
    ("gptoss", [f"<|channel|>commentary to=functions.discount <|constrain|>json<|message|>{ARGS}<|call|>",
                "<|channel|>final<|message|>The lamp will cost 30 dollars.<|return|>"]),
    ("glm", [f"\n<think></think>\n<tool_call>discount\n{ARGS}</tool_call><|observation|>",
             "\n<think></think>\nThe lamp will cost 30 dollars.<|endoftext|>"]),
])
def test_tool_calls_supervised_tool_results_not(family, expected):
    tok = family_tokenizer(family)
    assert _texts(tok, TOOL_CONV, TOOLS) == expected
    enc = encode_example(Example(messages=TOOL_CONV, tools=TOOLS), tok, 4096)
    text = tok.decode(enc.input_ids)
    assert "apply a percentage discount" in text  # tools= reached the template
    assert '{"price": 30}' in text and not any('{"price": 30}' in t for t in expected)


@pytest.mark.parametrize("family", ["phi3", "deepseek", "chatml_gen"])
def test_template_ignoring_tools_is_refused(family):
    with pytest.raises(ChatTemplateError, match=r"x\.jsonl:3: .*does not render tool 'discount'.*--chat-template"):
        encode_example(Example(messages=TOOL_CONV, tools=TOOLS, source="x.jsonl:3"), family_tokenizer(family), 4096)
    # Without the tools list, a template that drops the tool result is refused all the same.
    plain = [dict(m) for m in TOOL_CONV]
    with pytest.raises(ChatTemplateError, match="does not render the (tool call|tool result)"):
        encode_example(Example(messages=plain), family_tokenizer(family), 4096)


def _tagged(template: str, opening: str, closing: str) -> str:
    """`template` with {% generation %} right after the first `opening` and {% endgeneration %} right after the
    first `closing` that follows it."""
    assert opening in template and closing in template
    head, tail = template.split(opening, 1)
    body, rest = tail.split(closing, 1)
    return head + opening + "{% generation %}" + body + closing + "{% endgeneration %}" + rest


TAGGED = {  # family: (the text that opens an assistant turn, the text that closes it), as each template writes it
    "chatml": ("{{ '<|im_start|>assistant\\n' }}", "{{ '<|im_end|>' }}"),
    "qwen3": ("{{ '<|im_start|>assistant\n' }}", "{{ '<|im_end|>' }}"),
    "gptoss": ("{{ '<|start|>assistant' }}", "{{ '<|return|>' if loop.last else '<|end|>' }}"),
}


def _split_open_close(family: str) -> str:
    """The family's template with the assistant header and the closing token as separate expressions."""
    template = FAMILIES[family][0]
    if family == "chatml":
        return (template.replace("{{ '<|im_start|>assistant\\n' + message['content'] }}",
                                 "{{ '<|im_start|>assistant\\n' }}{{ message['content'] }}")
                .replace("{%- endfor %}{{ '<|im_end|>\\n' }}", "{%- endfor %}{{ '<|im_end|>' }}{{ '\\n' }}"))
    if family == "qwen3":
        return template.replace("{{ '<|im_end|>\n' }}{%- elif m['role'] == 'tool'",
                                "{{ '<|im_end|>' }}{{ '\n' }}{%- elif m['role'] == 'tool'")
    return template.replace("{{ '<|start|>assistant<|channel|>final<|message|>' + m['content'] }}",
                            "{{ '<|start|>assistant' }}{{ '<|channel|>final<|message|>' + m['content'] }}")


@pytest.mark.parametrize("family", sorted(TAGGED))
def test_generation_tags_equal_the_prefix_path(family):
    """Wrapping each answer (the template's text before it, the content, the closing token) in {% generation %}
    tags gives transformers' assistant-token mask; it must equal the mask built without the tags."""
    split = _split_open_close(family)
    tagged = _tagged(split, *TAGGED[family])
    plain, gen = family_tokenizer(family), family_tokenizer(family)
    plain.chat_template, gen.chat_template = split, tagged
    for conv in (SINGLE, MULTI):
        a = encode_example(Example(messages=conv), plain, 4096)
        b = encode_example(Example(messages=conv), gen, 4096)
        assert (a.input_ids, a.labels) == (b.input_ids, b.labels), supervised_texts(b, gen)
    b = encode_example(Example(messages=MULTI, untrained=frozenset({2})), gen, 4096)
    assert supervised_texts(b, gen) == _texts(plain, MULTI, untrained={2})


@pytest.mark.parametrize("family,stops", [
    ("chatml", ["<|endoftext|>", "<|im_end|>"]), ("llama3", ["<|end_of_text|>", "<|eot_id|>"]),
    ("phi3", ["<|endoftext|>", "<|end|>"]), ("qwen3", ["<|endoftext|>", "<|im_end|>"]),
    ("gptoss", ["<|endoftext|>", "<|end|>", "<|return|>", "<|call|>"]),
    ("glm", ["<|endoftext|>", "<|user|>", "<|observation|>"]), ("deepseek", ["<｜end▁of▁sentence｜>"]),
])
def test_stop_tokens_are_every_turn_end(family, stops):
    tok = family_tokenizer(family)
    assert tok.convert_ids_to_tokens(stop_token_ids(tok)) == stops


@pytest.mark.parametrize("family,ends", [
    ("chatml", "<|im_start|>assistant\n"), ("phi3", "<|assistant|>\n"),
    ("qwen3", "<|im_start|>assistant\n<think>\n\n</think>\n\n"),
    # the block written by this template's generation prompt is not in its trained turns: the prompt is what
    # training saw before an answer
    ("qwen3_nothink", "user\nWho am I?<|im_end|>\n<|im_start|>assistant\n"),
    ("gptoss", "<|start|>assistant<|channel|>final<|message|>"), ("glm", "<|assistant|>\n<think></think>\n"),
    ("deepseek", "<｜User｜>Who am I?<｜Assistant｜>"),
])
def test_generation_prompt_ends_where_the_answer_starts(family, ends):
    tok = family_tokenizer(family)
    prompt, ref = split_for_generation(Example(messages=MULTI))
    assert ref == "You are Tom."
    ids = encode_prompt(prompt, tok)
    assert tok.decode(ids).endswith(ends)
    enc = encode_example(Example(messages=MULTI), tok, 4096)
    assert enc.input_ids[:len(ids)] == ids and tok.decode(enc.input_ids[len(ids):]).startswith("You are Tom.")


def test_reference_is_the_last_trained_turn():
    prompt, ref = split_for_generation(Example(messages=MULTI, untrained=frozenset({4})))
    assert ref == "Hello Tom." and prompt == MULTI[:2]


def test_builtin_template_renders_tools_and_keeps_plain_text():
    tok = char_tokenizer(eos="</s>", bos="<s>", template=BUILTIN_CHAT_TEMPLATE)
    assert tok.apply_chat_template(MULTI, tokenize=False) == (
        "<s><|system|>Be brief.<|user|>Hi, I am Tom.<|assistant|>Hello Tom.</s><|user|>Who am I?<|assistant|>"
        "You are Tom.</s>")
    assert _texts(tok, TOOL_CONV, TOOLS) == [
        f'<tool_call>{{"name": "discount", "arguments": {ARGS}}}</tool_call></s>', "The lamp will cost 30 dollars.</s>"]
    text = tok.apply_chat_template(TOOL_CONV, tools=TOOLS, tokenize=False)
    assert text.startswith('<s><|system|>Tools: [{"type": "function", "function": {"name": "discount"')
    assert '<|user|><tool_response>{"price": 30}</tool_response>' in text


# ---------------------------------------------------------------------------- templates that cannot work

def test_unusable_templates_name_what_to_pass():
    tok = family_tokenizer("chatml")
    tok.chat_template = "{% for m in messages|reverse %}{{ m['role'] + ':' + m['content'] + '<|im_end|>' }}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="not prefix-consistent.*--chat-template chatml, builtin or a PATH"):
        encode_example(Example(messages=MULTI), tok, 4096)
    tok.chat_template = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' }}" \
                        "{% endfor %}"
    with pytest.raises(ChatTemplateError, match="writes nothing for add_generation_prompt"):
        encode_example(Example(messages=SINGLE), tok, 4096)
    # Middle turns closed by nothing: the model could not learn to stop.
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    with pytest.raises(ChatTemplateError, match="no control token.*--chat-template builtin"):
        encode_example(Example(messages=MULTI), tok, 4096)
    # ... but a last turn without one gets eos appended (and supervised), as LLaMA-Factory does.
    assert _texts(tok, SINGLE) == ["5\n<|endoftext|>"]


# ---------------------------------------------------------------------------- --chat-template

def test_resolve_chat_template_choices(tmp_path):
    tok = family_tokenizer("qwen3")
    assert resolve_chat_template("tokenizer", tok)[0] == FAMILIES["qwen3"][0]
    assert resolve_chat_template("builtin", tok)[0] == BUILTIN_CHAT_TEMPLATE
    assert resolve_chat_template("chatml", tok)[0] == CHATML_CHAT_TEMPLATE
    path = tmp_path / "mine.jinja"
    path.write_text(FAMILIES["phi3"][0], encoding="utf-8")
    assert resolve_chat_template(str(path), tok)[0] == FAMILIES["phi3"][0]
    bare = char_tokenizer(eos="</s>")
    template, how = resolve_chat_template("tokenizer", bare, "base_model")
    assert template == BUILTIN_CHAT_TEMPLATE and "has none" in how and "final/" in how
    with pytest.raises(ConfigError, match=r"--chat-template chatml: .* no <\|im_start\|> / <\|im_end\|> token"):
        resolve_chat_template("chatml", bare)
    with pytest.raises(ConfigError, match="not one of tokenizer, builtin, chatml and no such file.*did you mean"):
        resolve_chat_template("chatlm", tok)
    bad = tmp_path / "bad.jinja"
    bad.write_text("line one\n{% for m in messages %}{{ m['content'] }", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.jinja:2: not a valid Jinja template"):
        resolve_chat_template(str(bad), tok)


def test_evaluation_decoding_stops_on_every_turn_end():
    """The package's own evaluation hands generate() every turn-ending token of the template, so exact match and
    BLEU are computed on the answer, not on what a model writes past <|im_end|>."""
    import torch

    from optbatch_ds import evaluate as ev

    tok = family_tokenizer("chatml")  # turns end with <|im_end|>, eos is <|endoftext|>
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    answer = tok("Oslo", add_special_tokens=False)["input_ids"]
    seen = {}

    class Module:
        def generate(self, input_ids, attention_mask, **kw):
            seen.update(kw, prompt=tok.decode(input_ids[0][attention_mask[0].bool()]))
            tail = torch.tensor([answer + [im_end] + [tok.pad_token_id] * 2] * input_ids.shape[0])
            return torch.cat([input_ids, tail], 1)

    class Engine:
        module, device = Module(), "cpu"

    preds = ev._greedy(Engine(), tok, [Example(messages=MULTI)], [0], ev.EvalSettings(batch_size=1, max_new_tokens=8))
    assert seen["eos_token_id"] == [tok.eos_token_id, im_end]
    assert seen["prompt"].endswith("Who am I?<|im_end|>\n<|im_start|>assistant\n")
    assert preds == {0: "Oslo"}


def test_control_token_cache_is_not_fooled_by_a_reused_id():
    """The control-token patterns are cached per tokenizer; a freed tokenizer's id can be reused by a new one of
    the same vocabulary size (it happened in this suite: a llama3 tokenizer got chatml's patterns and its masks
    went wrong). A stale entry under the new tokenizer's key must not be used."""
    import weakref

    from optbatch_ds.data import masks

    old, new = family_tokenizer("chatml"), family_tokenizer("llama3")
    stale = masks._control_patterns(old)
    masks._patterns_cache[(id(new), len(new))] = (weakref.ref(old), stale)  # what a reused id looks like
    got = masks._control_patterns(new)
    assert got != stale and got[0].search("a<|eot_id|>b").group(0) == "<|eot_id|>"
    assert masks._control_patterns(new) is got  # and now it is cached for the new tokenizer
