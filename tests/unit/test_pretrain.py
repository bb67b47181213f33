"""Unit tests of the pretrained base (optbatch_ds.bench.pretrain) and the answer-NLL check, on a tiny corpus.

    python -m pytest tests/unit/test_pretrain.py -q
"""
import json

import pytest
import torch

from optbatch_ds.bench import pretrain as pt
from optbatch_ds.bench.answer_nll import _final_turn_only, answer_nll, chat_warmup, check, format_table, load_model
from optbatch_ds.data import BUILTIN_CHAT_TEMPLATE, DataError, Encoded
from optbatch_ds.data.chat import ROLE_TOKENS
from optbatch_ds.data.demo import DemoSpec, make_demo_data

pytestmark = pytest.mark.unit

TINY = pt.PretrainSpec(block_size=64, batch_size=4, warmup_steps=2, log_every=5, learning_rate=5e-3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    data = make_demo_data(root / "data", seed=0, spec=DemoSpec(n_train=90, n_eval_per_task=3,
                                                               n_reference_per_task=3, n_pretrain_docs=80))
    torch.set_num_threads(1)
    path = pt.pretrained_base(data["pretrain"], data["train"], str(root / "cache"), seed=0, steps=15, spec=TINY)
    return data, root, path


def test_base_loads_as_a_hugging_face_model_with_the_builtin_template(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, path = tiny
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.vocab_size == len(tok) and model.config.hidden_size == 128
    assert tok.chat_template == BUILTIN_CHAT_TEMPLATE
    assert all(len(tok(t, add_special_tokens=False)["input_ids"]) == 1 for t in ROLE_TOKENS)


def test_loss_falls_and_the_log_is_written(tiny):
    _, _, path = tiny
    with open(f"{path}/{pt.LOG_FILE}") as f:
        log = json.load(f)
    curve = log["curve"]
    assert [p["step"] for p in curve] == [5, 10, 15] and log["steps"] == 15
    assert curve[-1]["loss"] < curve[0]["loss"] - 0.5 and curve[-1]["eval_loss"] < curve[0]["eval_loss"]
    assert log["wall_s"] > 0 and log["tokens_seen"] == 15 * 4 * 64 and log["final_loss"] == curve[-1]["loss"]


def test_second_call_is_a_cache_hit_and_settings_change_the_key(tiny, monkeypatch):
    data, root, path = tiny

    def no_training(*a, **k):
        raise AssertionError("a cached base must not be pretrained again")

    monkeypatch.setattr(pt, "pretrain", no_training)
    assert pt.pretrained_base(data["pretrain"], data["train"], str(root / "cache"), seed=0, steps=15, spec=TINY) == path
    with pytest.raises(AssertionError, match="pretrained again"):
        pt.pretrained_base(data["pretrain"], data["train"], str(root / "cache"), seed=0, steps=16, spec=TINY)


def test_blocks_pack_documents_between_bos_and_eos(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny[2])
    blocks = pt.pack_blocks(["the cat sleeps", "Zorbish has no articles."] * 20, tok, 16)
    assert blocks.dtype == torch.long and blocks.shape[1] == 16
    flat = blocks.flatten().tolist()
    assert flat[0] == tok.bos_token_id and flat.count(tok.eos_token_id) >= blocks.numel() // 16 - 1
    with pytest.raises(pt.ConfigError, match="fewer than two blocks"):
        pt.pack_blocks(["short"], tok, 256)


def test_corpus_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    with pytest.raises(DataError, match="c.jsonl:2"):
        pt.read_corpus(str(bad))
    with pytest.raises(pt.ConfigError, match="cannot read"):
        pt.read_corpus(str(tmp_path / "missing.jsonl"))
    with pytest.raises(pt.ConfigError, match="steps"):
        pt.pretrained_base(str(bad), str(bad), str(tmp_path), steps=0)


def test_answer_nll_pairs_correct_and_wrong_answers(tiny):
    data, _, path = tiny
    model, tok = load_model(path)
    result = answer_nll(model, tok, data["train"], max_per_task=10)
    tasks = ("dialogue", "qa", "translation")
    assert set(result) == {*tasks, "all"} and result["all"]["n"] == sum(result[t]["n"] for t in tasks)
    assert result["qa"]["n"] == 10 and all(0 < result[t]["n"] <= 10 for t in tasks)
    for r in result.values():
        for part in ("answer", "sample"):
            assert all(torch.isfinite(torch.tensor(v)) for v in r[part].values())
            assert 0 <= r[part]["wins_same_task"] <= 1 and 0 <= r[part]["wins_any_task"] <= 1
    assert "| qa | 10 |" in format_table(result)
    losses = chat_warmup(model, tok, data["reference"], steps=3)
    assert len(losses) == 3 and not model.training
    scratch, _ = load_model(path, scratch_seed=0)
    assert not torch.equal(scratch.lm_head.weight, load_model(path)[0].lm_head.weight)


def test_check_encodes_at_the_runs_sequence_length(tiny):
    """The check scores records at the fine-tuning runs' --max-seq-len (pydoc's prompts need 512): a limit the
    prompts do not fit in is an error naming the record, a sufficient one scores base and scratch."""
    data, _, path = tiny
    with pytest.raises(DataError, match="max_seq_len=8"):
        check(path, data["train"], data["reference"], warmup_steps=(0,), max_seq_len=8)
    result = check(path, data["train"], data["reference"], warmup_steps=(0,), max_seq_len=512)
    assert set(result) == {"base@0", "scratch@0"} and result["base@0"]["all"]["n"] > 0


def test_final_turn_only_keeps_the_last_supervised_run():
    enc = Encoded(input_ids=list(range(9)), labels=[-100, 1, 2, -100, -100, 5, 6, 7, -100], n_supervised=5,
                  truncated=False)
    last = _final_turn_only(enc)
    assert last.labels == [-100, -100, -100, -100, -100, 5, 6, 7, -100] and last.n_supervised == 3
    assert enc.labels[1] == 1  # the original is left alone
