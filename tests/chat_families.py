"""Chat template families for the tests, written here (not copied from any model), each with a character-level
tokenizer holding that family's control tokens, so the supervised text of a mask is exactly a span of the
rendered text.

    tok = family_tokenizer("qwen3")           # a PreTrainedTokenizerFast, template set
    runs = supervised_texts(encode_example(Example(messages=...), tok, 4096), tok)

Families: chatml (the package's ChatML, with tools), llama3, phi3 (closes turns with <|end|>, ends a whole
conversation with eos), qwen3 (an empty reasoning block in the turns after the last user message),
qwen3_nothink (the block written by the generation prompt instead), gptoss (channel headers, <|return|> after
the last turn, <|call|> after a tool call), glm (no closing token: the next role token ends a turn), deepseek
(reasoning stripped from history, <think> opened by the generation prompt), and chatml_gen (ChatML with
{% generation %} tags, for transformers' assistant-token mask).
"""
from __future__ import annotations

from optbatch_ds.data import CHATML_CHAT_TEMPLATE, IGNORE_INDEX

LLAMA3 = (
    "{{ bos_token }}{% if tools %}{{ '<|start_header_id|>system<|end_header_id|>\n\nTools: ' + tools|tojson + "
    "'<|eot_id|>' }}{% endif %}{% for m in messages %}"
    "{% set role = 'ipython' if m['role'] == 'tool' else m['role'] %}"
    "{{ '<|start_header_id|>' + role + '<|end_header_id|>\n\n' }}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "{{ '{\"name\": \"' + c.function.name + '\", \"parameters\": ' + c.function.arguments|tojson + '}' }}"
    "{% endfor %}{% else %}{{ m['content'] | trim }}{% endif %}{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
PHI3 = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ '<|system|>\n' + m['content'] + '<|end|>\n' }}"
    "{% elif m['role'] == 'user' %}{{ '<|user|>\n' + m['content'] + '<|end|>\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ '<|assistant|>\n' + m['content'] + '<|end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
_QWEN3_TURNS = (
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for m in messages %}{% if m['role'] == 'user' %}{% set ns.last_query = loop.index0 %}{% endif %}{% endfor %}"
    "{%- if tools %}{{ '<|im_start|>system\n<tools>\n' }}{% for t in tools %}{{ t|tojson + '\n' }}{% endfor %}"
    "{{ '</tools><|im_end|>\n' }}{% endif %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{%- if THINK_IN_TURN and loop.index0 > ns.last_query %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{{ m['content'] }}"
    "{%- for c in (m.tool_calls or []) %}{{ '<tool_call>\n' + {'name': c.function.name, 'arguments': "
    "c.function.arguments}|tojson + '\n</tool_call>' }}{% endfor %}"
    "{{ '<|im_end|>\n' }}"
    "{%- elif m['role'] == 'tool' %}{{ '<|im_start|>user\n<tool_response>\n' + m['content'] + "
    "'\n</tool_response><|im_end|>\n' }}"
    "{%- else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}GEN_THINK{% endif %}"
)
QWEN3 = _QWEN3_TURNS.replace("THINK_IN_TURN", "true").replace("GEN_THINK", "")
QWEN3_NOTHINK = _QWEN3_TURNS.replace("THINK_IN_TURN", "false").replace("GEN_THINK", "{{ '<think>\n\n</think>\n\n' }}")
GPTOSS = (
    "{%- if tools %}{{ '<|start|>developer<|message|># Tools\n' }}{% for t in tools %}"
    "{{ '// ' + (t.function.description or '') + '\ntype ' + t.function.name + ' = () => any;\n' }}{% endfor %}"
    "{{ '<|end|>' }}{% endif %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'system' %}{{ '<|start|>system<|message|>' + m['content'] + '<|end|>' }}"
    "{%- elif m['role'] == 'user' %}{{ '<|start|>user<|message|>' + m['content'] + '<|end|>' }}"
    "{%- elif m['role'] == 'assistant' and m.tool_calls %}{% for c in m.tool_calls %}"
    "{{ '<|start|>assistant<|channel|>commentary to=functions.' + c.function.name + ' <|constrain|>json<|message|>'"
    " + c.function.arguments|tojson + '<|call|>' }}{% endfor %}"
    "{%- elif m['role'] == 'assistant' %}{{ '<|start|>assistant<|channel|>final<|message|>' + m['content'] }}"
    "{{ '<|return|>' if loop.last else '<|end|>' }}"
    "{%- elif m['role'] == 'tool' %}{{ '<|start|>functions.tool to=assistant<|channel|>commentary<|message|>' + "
    "m['content'] + '<|end|>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|start|>assistant' }}{% endif %}"
)
GLM = (
    "[gMASK]<sop>{% if tools %}<|system|>\n# Tools\n{{ tools|tojson }}{% endif %}{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>\n{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<|user|>\n{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>\n<think></think>\n{{ m['content'] }}"
    "{% for c in (m.tool_calls or []) %}<tool_call>{{ c.function.name }}\n{{ c.function.arguments|tojson }}"
    "</tool_call>{% endfor %}"
    "{% elif m['role'] == 'tool' %}<|observation|>\n{{ m['content'] }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
DEEPSEEK = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{% set c = m['content'] %}"
    "{% if '</think>' in c %}{% set c = c.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + c + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\n' }}{% endif %}"
)
CHATML_GEN = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]
# name: (template, special tokens (besides eos / bos), added non-special tokens, eos, bos)
FAMILIES = {
    "chatml": (CHATML_CHAT_TEMPLATE, _CHATML_TOKENS, ["<tool_call>", "</tool_call>"], "<|endoftext|>", None),
    "chatml_gen": (CHATML_GEN, _CHATML_TOKENS, [], "<|endoftext|>", None),
    "llama3": (LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], [], "<|end_of_text|>",
               "<|begin_of_text|>"),
    "phi3": (PHI3, ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], [], "<|endoftext|>", None),
    "qwen3": (QWEN3, _CHATML_TOKENS, ["<think>", "</think>", "<tool_call>", "</tool_call>"], "<|endoftext|>", None),
    "qwen3_nothink": (QWEN3_NOTHINK, _CHATML_TOKENS, ["<think>", "</think>", "<tool_call>", "</tool_call>"],
                      "<|endoftext|>", None),
    "gptoss": (GPTOSS, ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>",
                        "<|constrain|>"], [], "<|endoftext|>", None),
    "glm": (GLM, ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"],
            ["<tool_call>", "</tool_call>"],
            "<|endoftext|>", None),
    "deepseek": (DEEPSEEK, ["<｜User｜>", "<｜Assistant｜>"], [], "<｜end▁of▁sentence｜>",
                 "<｜begin▁of▁sentence｜>"),
}


def char_tokenizer(special=(), added=(), eos="</s>", bos=None, template=None):
    """A character-level fast tokenizer (printable ASCII, newline and a few accented letters; <unk> for the rest)
    with `special` as special tokens and `added` as plain added tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["<unk>"] + [chr(i) for i in range(32, 127)] + ["\n", "é", "ü", "ñ"]
    backend = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    spec = {"eos_token": eos, "pad_token": "<pad>", "extra_special_tokens": list(special)}
    if bos:
        spec["bos_token"] = bos
    tok.add_special_tokens(spec)
    if added:
        tok.add_tokens(list(added))
    tok.chat_template = template
    return tok


def family_tokenizer(name: str):
    template, special, added, eos, bos = FAMILIES[name]
    return char_tokenizer(special, added, eos, bos, template)


def supervised_runs(enc) -> list[list[int]]:
    """The supervised token ids of an Encoded, run by run (each label equals its input id)."""
    runs, cur = [], []
    for i, label in zip(enc.input_ids, enc.labels):
        if label != IGNORE_INDEX:
            assert label == i
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def supervised_texts(enc, tok) -> list[str]:
    """The supervised tokens of an Encoded, decoded run by run (control tokens kept)."""
    return [tok.decode(r, skip_special_tokens=False) for r in supervised_runs(enc)]
