"""Fitting a model (attention kernels, checkpointing, LoRA wrapping), what a run keeps (rotation, weights-only
checkpoints) and trackers: the pure and single-process parts.

    python -m pytest tests/unit/test_fit.py -q
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from optbatch_ds.checkpoint import find_resume, latest_complete, rotate, write_complete_marker
from optbatch_ds.config import RunConfig
from optbatch_ds.errors import ResumeError

pytestmark = pytest.mark.unit


def _tiny_llama(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    path = tmp_path / "tiny"
    if not path.exists():
        model.save_pretrained(path)
    return str(path)


def test_eager_and_sdpa_give_the_same_logits(tmp_path):
    """--attn-implementation eager vs sdpa through modeling.load_model: same logits (1e-5) on a right-padded batch,
    at every position that attends to tokens; the kernel in use is what was asked for."""
    from optbatch_ds.modeling import attention_in_use, load_model

    path = _tiny_llama(tmp_path)
    ids = torch.randint(1, 97, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    logits = {}
    for attn in ("eager", "sdpa"):
        model, _ = load_model(path, {}, options=RunConfig(model=path, attn_implementation=attn))
        assert attention_in_use(model) == attn
        with torch.no_grad():
            logits[attn] = model.eval()(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(logits["eager"][keep], logits["sdpa"][keep], rtol=0, atol=1e-5)


def test_checkpointing_is_for_the_training_forward_only(tmp_path):
    """Non-reentrant checkpointing is switched on for training; scoring (eval mode, no_grad) does not recompute, and
    the gradients equal those without checkpointing."""
    from optbatch_ds.modeling import enable_gradient_checkpointing, load_model

    path = _tiny_llama(tmp_path)
    ids = torch.randint(1, 97, (2, 10), generator=torch.Generator().manual_seed(2))
    grads = []
    for on in (False, True):
        model, _ = load_model(path, {}, options=RunConfig(model=path))
        if on:
            assert enable_gradient_checkpointing(model, frozen_under_zero3=False) is False  # use_reentrant
            assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-6)


def test_lora_wrapping_freezes_the_base_and_keeps_the_head_unless_asked(tmp_path):
    from optbatch_ds.adapters import is_peft_model, wrap_lora
    from optbatch_ds.modeling import load_model
    from optbatch_ds.scoring import output_layer_trains

    path = _tiny_llama(tmp_path)
    model, _ = load_model(path, {})
    wrapped = wrap_lora(model, RunConfig(model=path, use_peft=True, lora_r=2))
    assert is_peft_model(wrapped) and not output_layer_trains(wrapped)
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("mlp.down_proj.lora_A" in n for n in trainable)  # all-linear: MLP too, not only attention
    model, _ = load_model(path, {})
    head = wrap_lora(model, RunConfig(model=path, use_peft=True, lora_r=2, lora_modules_to_save=("lm_head",),
                                      lora_target_modules=("q_proj", "v_proj")))
    assert output_layer_trains(head)
    assert not any("mlp" in n for n, p in head.named_parameters() if p.requires_grad)


# ---------------------------------------------------------------------------- checkpoints kept


def _tags(root, steps, incomplete=(), weights_only=()):
    for s in steps:
        d = root / f"step_{s:06d}"
        d.mkdir(parents=True)
        if s not in incomplete:
            write_complete_marker(str(d), s, resumable=s not in weights_only)
    return root


def _left(root):
    return sorted(int(d[5:]) for d in os.listdir(root) if d.startswith("step_"))


def test_rotation_keeps_the_newest_n_and_the_best(tmp_path):
    root = _tags(tmp_path / "checkpoints", [1, 2, 3, 4, 5, 6], incomplete=(2,))
    gone = rotate(str(root), 2, protect=(str(root / "step_000003"),))
    assert _left(root) == [3, 5, 6] and len(gone) == 3  # 1, 4 and the crashed save 2
    assert rotate(str(root), 2, protect=(str(root / "step_000006"),)) == [str(root / "step_000003")]
    assert _left(root) == [5, 6]
    assert rotate(str(root), 0) == [] and _left(root) == [5, 6]  # 0: keep everything


def test_rotation_never_deletes_the_newest_complete_or_a_later_incomplete_save(tmp_path):
    root = _tags(tmp_path / "checkpoints", [1, 2, 3], incomplete=(3,))
    rotate(str(root), 1)
    assert _left(root) == [2, 3]  # 3 may be a save in progress elsewhere: only older crashed saves go


def test_weights_only_checkpoints_are_never_resumed(tmp_path):
    root = _tags(tmp_path / "checkpoints", [2, 4], weights_only=(4,))
    assert latest_complete(str(root)) == str(root / "step_000002")
    assert latest_complete(str(root), resumable=False) == str(root / "step_000004")
    assert find_resume("auto", str(root)) == str(root / "step_000002")
    with pytest.raises(ResumeError, match="--save-only-model"):
        find_resume(str(root / "step_000004"), str(root))
    only = _tags(tmp_path / "other" / "checkpoints", [3], weights_only=(3,))
    with pytest.raises(ResumeError, match="hold weights only"):
        find_resume("auto", str(only))
    old = _tags(tmp_path / "old" / "checkpoints", [1])
    json.dump({"step": 1}, open(old / "step_000001" / "COMPLETE", "w"))  # written before the flag existed
    assert find_resume("auto", str(old)) == str(old / "step_000001")


# ---------------------------------------------------------------------------- trackers


def test_tensorboard_tracker_writes_the_loss(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from optbatch_ds.tracking import Tracker

    assert not Tracker.build("tensorboard", str(tmp_path), "run", {}, rank=1).active  # rank 0 only
    tracker = Tracker.build("tensorboard", str(tmp_path), "run", {"run": {"lora_r": 16}}, rank=0)
    for step in (1, 2):
        tracker.log_step({"step": step, "loss": 3.0 / step, "time": {"train": 0.5}, "curvature": "ema", "x": None})
    tracker.log_eval({"step": 2, "loss": 1.25, "tasks": {"qa": {"bleu4": 10.0, "n": 3}}, "samples": [1]})
    tracker.finish()
    acc = EventAccumulator(str(tmp_path / "runs" / "run"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/time/train", "eval/loss", "eval/tasks/qa/bleu4"} <= set(tags)
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 3.0), (2, 1.5)]


def test_missing_tracker_package_is_a_user_error(monkeypatch):
    import importlib.util

    from optbatch_ds.errors import ConfigError
    from optbatch_ds.tracking import check_report_to

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r'--report-to wandb needs the wandb package: pip install -e "\.\[wandb\]"'):
        check_report_to("wandb")
    check_report_to("none")


def test_wandb_runs_offline_without_network(monkeypatch, tmp_path):
    """No WANDB_MODE and no route to api.wandb.ai: the run is kept offline under output_dir (wandb sync later)."""
    import importlib.machinery
    import sys
    import types

    from optbatch_ds import tracking

    calls = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: calls.append(("init", kw, os.environ.get("WANDB_MODE"))) or types.SimpleNamespace(
        log=lambda values, step: calls.append(("log", values, step)), finish=lambda: calls.append(("finish",)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(tracking, "_online", lambda *a, **k: False)
    tracker = tracking.Tracker.build("wandb", str(tmp_path), "run1", {"run": {"lora_r": 16}}, rank=0)
    tracker.log_step({"step": 3, "loss": 0.5})
    tracker.finish()
    assert calls[0][0] == "init" and calls[0][2] == "offline" and calls[0][1]["dir"] == str(tmp_path)
    assert calls[1] == ("log", {"train/loss": 0.5}, 3) and calls[2] == ("finish",)
