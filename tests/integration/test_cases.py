"""Each folder of tests/fixtures/cases (copied from the failing inputs users brought), run through the real entry
point as a user would, asserting what the folder's README row says a user expects.

    python -m pytest tests/integration/test_cases.py -q

One process per run (`python launch/train.py ... --max-steps 3`, the built-in model architecture, CPU; a run is
tens of seconds), and as few runs as the cases allow: the data cases (turn_weight, tool_turns, bom,
array_in_jsonl) train together under hf_style_auto's DeepSpeed JSON and a --chat-template PATH.jinja; the two
no_optimizer configs go with no_chat_template (ZeRO-3) and chatml_turn_end (ZeRO-2); two refusals stop before
any model is loaded. The model directories the README describes are built here: the built-in model trained on
the cases' text, a copy without chat template and role tokens, a copy with ChatML tokens, a tied-embedding one.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO, read_jsonl

pytestmark = pytest.mark.integration

CASES = os.path.join(REPO, "tests", "fixtures", "cases")
_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
ENV = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
ENV.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


def case(*parts) -> str:
    return os.path.join(CASES, *parts)


def train(out, *args, timeout=600):
    cmd = [sys.executable, "launch/train.py", "--output-dir", str(out), "--log-every", "0", "--max-steps", "3", *args]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    proc.seconds = time.monotonic() - t0
    return proc


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-5000:]
    return proc


def refused(proc, *needles) -> str:
    """Exit 2 and one `error:` line holding every needle, no traceback, nothing trained."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr[-4000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert "optbatch_ds | world" not in proc.stdout  # the banner comes after the model is loaded
    return errors[0]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("cases")


@pytest.fixture(scope="module")
def model(root):
    """The built-in model and tokenizer, trained on the text of every case (the built-in template)."""
    from optbatch_ds.data import load_examples
    from optbatch_ds.modeling import build_default_model

    texts = []
    for path in (case("turn_weight", "turn_weight.jsonl"), case("tool_turns", "tools.jsonl"),
                 case("chatml_turn_end", "data.jsonl"), case("tied_zero0", "data.jsonl"),
                 case("no_chat_template", "data.jsonl")):
        texts += [m["content"] for e in load_examples(path) for m in e.messages]
    return build_default_model(texts * 4, str(root / "cache"))


# ---------------------------------------------------------------------------- data cases, one run

DATA_FILES = (("turn_weight", "turn_weight.jsonl"), ("tool_turns", "tools.jsonl"),
              ("tool_turns", "tools_field_only.jsonl"), ("hf_style_auto", "data.jsonl"), ("bom", "bom.json"),
              ("bom", "bom.jsonl"), ("array_in_jsonl", "array_oneline.jsonl"),
              ("array_in_jsonl", "array_pretty.jsonl"), ("array_in_jsonl", "lines_named.json"))
MY_TEMPLATE = "{#- mine: the built-in template, from a file -#}\n"


@pytest.fixture(scope="module")
def data_run(root, model):
    """One run over every data case (a folder of their files, --on-bad-record skip so nothing stops it), with
    hf_style_auto's DeepSpeed JSON and the built-in template passed as a file: (output dir, process, template)."""
    from optbatch_ds.data import BUILTIN_CHAT_TEMPLATE

    folder = root / "data_cases"
    folder.mkdir()
    for kind, name in DATA_FILES:
        shutil.copy(case(kind, name), folder / f"{kind}__{name}")
    template = MY_TEMPLATE + BUILTIN_CHAT_TEMPLATE
    (root / "mine.jinja").write_text(template)
    out = root / "data_run"
    proc = ok(train(out, "--model", model, "--data", str(folder), "--on-bad-record", "skip", "--deepspeed",
                    case("hf_style_auto", "hf_style_z3.json"), "--chat-template", str(root / "mine.jinja")))
    return out, proc, template


def _supervised(tok, example, max_len=512):
    from optbatch_ds.data import encode_example
    from tests.chat_families import supervised_texts

    return [t.strip() for t in supervised_texts(encode_example(example, tok, max_len), tok)]


def test_data_cases_train_together(data_run):
    """Every record of every data case is read (nothing counted as bad) and trained on for 3 steps."""
    from optbatch_ds.data import load_examples

    out, _, _ = data_run
    assert json.load(open(out / "bad_records.json"))["count"] == 0
    n = sum(len(load_examples(case(kind, name))) for kind, name in DATA_FILES)  # each strict, alone
    assert json.load(open(out / "config.json"))["derived"]["num_train_samples"] == n
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]


def test_turn_weight(root, model):
    """The wrong turn marked "weight": 0 is out of the loss; an unknown per-turn key is an error naming file, line
    and key (or a counted skip)."""
    from optbatch_ds.data import load_examples
    from optbatch_ds.modeling import load_tokenizer

    data = case("turn_weight", "turn_weight.jsonl")
    ex = load_examples(data)[3]
    assert _supervised(load_tokenizer(model), ex) == ["Sorry, 7 plus 5 is 12.</s>"]
    typo = root / "turn_weigth.jsonl"
    typo.write_text(open(data).read().replace('"weight": 0', '"weigth": 0'))
    refused(train(root / "turn_weigth", "--model", model, "--data", str(typo), "--no-export"),
            f"{typo}:4: field 'conversations[1].weigth'", "did you mean 'weight'", "--on-bad-record skip")
    # (with --on-bad-record skip it is counted and the others train: tests/unit/test_formats_users.py)


def test_tool_turns(model):
    """Tool calls and results go through the tokenizer's template with tools=; results are never supervised, the
    call is."""
    from optbatch_ds.data import encode_example, load_examples
    from optbatch_ds.modeling import load_tokenizer

    tok = load_tokenizer(model)
    ex = load_examples(case("tool_turns", "tools.jsonl"))[4]
    assert _supervised(tok, ex) == ['<tool_call>{"name": "discount", "arguments": {"price": 40, "pct": 25}}'
                                    '</tool_call></s>', "The lamp will cost 30 dollars.</s>"]
    text = tok.decode(encode_example(ex, tok, 512).input_ids)
    assert '"description": "apply a percentage discount"' in text and '<tool_response>{"price": 30}' in text
    only = load_examples(case("tool_turns", "tools_field_only.jsonl"))[4]
    text = tok.apply_chat_template(only.messages, tools=only.tools, tokenize=False)
    assert text.startswith('<s><|system|>Tools: [{"type": "function", "function": {"name": "discount"')
    assert " Tools: [" in tok.decode(encode_example(only, tok, 512).input_ids)  # (the tokenizer's word boundary)
    assert _supervised(tok, only) == ["Hello.</s>"]


def test_bom_and_array_in_jsonl(data_run):
    """Byte-order marks dropped, content detected whatever the suffix: every record of every file is read."""
    from optbatch_ds.data import load_examples

    _, proc, _ = data_run
    for kind, name in DATA_FILES[4:]:
        assert len(load_examples(case(kind, name))) == 16, name
    assert "array_in_jsonl__array_pretty.jsonl holds a JSON array although it is named .jsonl" in proc.stderr
    assert "rename it to *.jsonl" in proc.stderr  # lines_named.json


def test_chat_template_path_is_used_and_exported(data_run):
    """--chat-template PATH.jinja: the file's template is what final/ holds."""
    from transformers import AutoTokenizer

    out, _, template = data_run
    assert json.load(open(out / "config.json"))["run"]["chat_template"].endswith("mine.jinja")
    assert AutoTokenizer.from_pretrained(out / "final").chat_template == template


# ---------------------------------------------------------------------------- DeepSpeed JSON

def test_hf_style_auto(data_run):
    """Every "auto" HF's integration fills is filled as it fills it and recorded; the run trains."""
    out, _, _ = data_run
    ds = json.load(open(out / "config.json"))["deepspeed"]
    assert ds["gradient_clipping"] == 1.0 and ds["fp16"]["enabled"] is False and ds["bf16"]["enabled"] is False
    assert ds["zero_optimization"]["reduce_bucket_size"] == 128 * 128
    assert ds["zero_optimization"]["stage3_prefetch_bucket_size"] == int(0.9 * 128 * 128)
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 1280
    assert "auto" not in json.dumps(ds)


def _default_optimizer_trained(out, proc):
    """No optimizer / scheduler section: Hugging Face's defaults, recorded; the run trains (and its curvature
    reads the default AdamW's state)."""
    from optbatch_ds.config import DEFAULT_LR_PRETRAINED  # --model given: a fine-tuning rate

    cfg = json.load(open(out / "config.json"))
    assert cfg["derived"]["sections_added"] == ["optimizer", "scheduler"]
    assert cfg["deepspeed"]["optimizer"] == {"type": "AdamW", "params": {
        "lr": DEFAULT_LR_PRETRAINED, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}}
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3] and metrics[-1]["lr"] > 0
    assert "raw output-layer gradient" not in proc.stderr


def test_fp16_on_cpu(root, model):
    """fp16 on a CPU machine: a config error naming fp16.enabled in seconds, before data or model load."""
    proc = train(root / "fp16", "--model", model, "--data", case("fp16_on_cpu", "data.jsonl"),
                 "--deepspeed", case("fp16_on_cpu", "fp16_true.json"), "--no-export")
    refused(proc, "fp16_true.json: fp16.enabled is true, but this machine trains on the CPU")
    assert not (root / "fp16" / "config.json").exists()  # written after the data and model are prepared


# ---------------------------------------------------------------------------- model directories

def _without_template(model, target):
    """The built-in model's directory with the chat template and the role tokens removed (a base model)."""
    shutil.copytree(model, target)
    os.remove(os.path.join(target, "chat_template.jinja"))
    cfg_path = os.path.join(target, "tokenizer_config.json")
    cfg = json.load(open(cfg_path))
    cfg.pop("extra_special_tokens", None)
    cfg.pop("chat_template", None)
    json.dump(cfg, open(cfg_path, "w"), indent=1)
    tj_path = os.path.join(target, "tokenizer.json")
    tj = json.load(open(tj_path))
    roles = ("<|system|>", "<|user|>", "<|assistant|>")
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["content"] not in roles]
    json.dump(tj, open(tj_path, "w"))
    return str(target)


def test_no_chat_template_and_no_optimizer(root, model):
    """A base model's tokenizer has no template: the built-in one is trained with and saved into final/. The
    DeepSpeed JSON (ZeRO-3) has no optimizer or scheduler section: no_optimizer's expectations hold."""
    from transformers import AutoTokenizer

    from optbatch_ds.data import BUILTIN_CHAT_TEMPLATE

    base = _without_template(model, root / "base_model")
    assert AutoTokenizer.from_pretrained(base).chat_template is None
    out = root / "no_template"
    proc = ok(train(out, "--model", base, "--data", case("no_chat_template", "data.jsonl"),
                    "--deepspeed", case("no_optimizer", "no_optimizer.json")))
    assert "the built-in chat template" in proc.stderr
    tok = AutoTokenizer.from_pretrained(out / "final")
    assert tok.chat_template == BUILTIN_CHAT_TEMPLATE
    text = tok.apply_chat_template([{"role": "user", "content": "Add 2 and 3."}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<s><|user|>Add 2 and 3.<|assistant|>"
    assert json.load(open(out / "final" / "generation_config.json"))["eos_token_id"] == tok.eos_token_id
    _default_optimizer_trained(out, proc)


def _chatml_model(model, target):
    """<|im_start|> / <|im_end|> added as special tokens, a ChatML template, eos left as the base tokenizer's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optbatch_ds.data import CHATML_CHAT_TEMPLATE

    tok = AutoTokenizer.from_pretrained(model)
    tok.add_special_tokens({"extra_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML_CHAT_TEMPLATE
    m = AutoModelForCausalLM.from_pretrained(model)
    m.resize_token_embeddings(len(tok))
    m.save_pretrained(target)
    tok.save_pretrained(target)
    return str(target), tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id


def test_chatml_turn_end_and_no_optimizer_z2(root, model):
    """Turns end with <|im_end|>, eos is another token: both stop generation, in the export and in evaluation.
    The DeepSpeed JSON (ZeRO-2) has no optimizer or scheduler section: no_optimizer's expectations hold."""
    from transformers import AutoTokenizer, GenerationConfig

    chatml, im_end, eos = _chatml_model(model, root / "chatml_model")
    out = root / "chatml"
    run = ok(train(out, "--model", chatml, "--data", case("chatml_turn_end", "data.jsonl"),
                   "--eval-data", case("chatml_turn_end", "eval.jsonl"), "--eval-max-new-tokens", "8",
                   "--deepspeed", case("no_optimizer", "no_optimizer_z2.json")))
    _default_optimizer_trained(out, run)
    gen = json.load(open(out / "final" / "generation_config.json"))
    assert gen["eos_token_id"] == [eos, im_end]
    result = json.load(open(out / "eval.json"))
    assert sum(t["n"] for t in result["tasks"].values()) == 4
    assert all("<|im_end|>" not in s["prediction"] for s in result["samples"])
    # the export as anyone loads it: the template renders, the generation config stops on both
    tok = AutoTokenizer.from_pretrained(out / "final")
    chat = [{"role": "user", "content": "Add 2 and 3."}]
    assert tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False).endswith(
        "<|im_start|>assistant\n")
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert tok.convert_ids_to_tokens(ids).count("<|im_start|>") == 2
    assert GenerationConfig.from_pretrained(out / "final").eos_token_id == [eos, im_end]


# ---------------------------------------------------------------------------- curvature

def test_tied_zero0(root):
    """Tied input/output embeddings under ZeRO stage 0: the curvature read works (no fallback to raw gradients)."""
    from optbatch_ds.data import load_examples
    from optbatch_ds.modeling import build_default_model

    data = case("tied_zero0", "data.jsonl")
    texts = [m["content"] for e in load_examples(data) for m in e.messages]
    tied = build_default_model(texts * 8, str(root / "cache"), config_overrides={"tie_word_embeddings": True})
    assert json.load(open(os.path.join(tied, "config.json")))["tie_word_embeddings"] is True
    proc = ok(train(root / "tied", "--model", tied, "--data", data, "--deepspeed", case("tied_zero0", "zero0.json"),
                    "--no-export"))
    assert "raw output-layer gradient" not in proc.stderr, proc.stderr[-3000:]
    assert [m["step"] for m in read_jsonl(root / "tied" / "metrics.jsonl")] == [1, 2, 3]
