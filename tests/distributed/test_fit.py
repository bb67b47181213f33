"""Fitting real models on 2 CPU ranks under ZeRO-3 (gloo): activation checkpointing, LoRA through PEFT (its
curvature, export and resume), checkpoint rotation with --export best, and the tensorboard tracker.

    python -m pytest tests/distributed/test_fit.py -q
"""
import functools
import json
import os
import shutil

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.helpers import REPO, load_safetensors, read_jsonl, train_body, zero3_argv

pytestmark = pytest.mark.distributed
_argv = functools.partial(zero3_argv, eval_samples=1, eval_tokens=4)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("fit")


def _gather_params(module, rank):
    import deepspeed

    named = list(module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
        return {n: p.detach().clone() for n, p in named} if rank == 0 else None


def _recipe_body(rank, world, argv):
    """The real recipe, plus every parameter (gathered, rank 0) before and after training, and which train."""
    os.chdir(REPO)
    from optbatch_ds import comm
    from optbatch_ds.config import parse_args
    from optbatch_ds.trainer import Recipe

    run = parse_args(argv)
    r, w, local = comm.init_distributed(120)
    recipe = Recipe.setup(run, r, w, local)
    recipe.history = []
    before = _gather_params(recipe.engine.module, r)
    result = recipe.loop()
    result["before"], result["after"] = before, _gather_params(recipe.engine.module, r)
    result["trainable"] = sorted(n for n, p in recipe.engine.module.named_parameters() if p.requires_grad)
    return result


@pytest.mark.timeout(1800)
def test_activation_checkpointing_changes_memory_not_results(runs):
    """--gradient-checkpointing recomputes activations in the backward: the same selections, losses and final
    weights as without it (1e-5), on both ranks; config.json records which ran."""
    out = {}
    for flag in ("--gradient-checkpointing", "--no-gradient-checkpointing"):
        out[flag] = runs / flag.strip("-")
        res = run_distributed(train_body, 2, args=(_argv(out[flag], "--max-steps", "3", flag),), timeout=1100)
        assert res[0]["history"] == res[1]["history"]
        out[flag + "history"] = res[0]["history"]
    on, off = out["--gradient-checkpointing"], out["--no-gradient-checkpointing"]
    assert out["--gradient-checkpointinghistory"] == out["--no-gradient-checkpointinghistory"]
    assert json.load(open(on / "config.json"))["model"]["gradient_checkpointing"] is True
    assert json.load(open(off / "config.json"))["model"]["gradient_checkpointing"] is False
    for a, b in zip(read_jsonl(on / "metrics.jsonl"), read_jsonl(off / "metrics.jsonl")):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    for a, b in zip(read_jsonl(on / "selection.jsonl"), read_jsonl(off / "selection.jsonl")):
        assert a["selected"] == b["selected"]
        assert a["losses"] == pytest.approx(b["losses"], abs=1e-4)  # rounded to 4 decimals in the file
    wa, wb = load_safetensors(on / "final"), load_safetensors(off / "final")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-5)


def _base_name(peft_name: str) -> str:
    """PEFT's name of a frozen base tensor -> the name in the base model's safetensors."""
    return peft_name.removeprefix("base_model.model.").replace(".base_layer.", ".")


LORA = ["--use-peft", "--gradient-checkpointing", "--lora-r", "4", "--lora-alpha", "8"]


@pytest.fixture(scope="module")
def lora_run(runs):
    """6 LoRA steps on 2 ZeRO-3 ranks, checkpointed at step 3, tensorboard on: (output dir, what each rank saw)."""
    out = runs / "lora"
    res = run_distributed(_recipe_body, 2, args=(_argv(out, "--max-steps", "6", "--save-every", "3",
                                                       "--report-to", "tensorboard", *LORA),), timeout=1500)
    return out, res


@pytest.mark.timeout(1800)
def test_lora_on_zero3_trains_adapters_only_and_exports(lora_run):
    """LoRA (PEFT, all-linear) on the built-in model, 2 ZeRO-3 ranks, checkpointing on: the base stays bitwise as
    loaded, every adapter tensor moves, the ranks agree, the curvature resolves to ema (lm_head is frozen) and every
    step logs it; final/adapter and the merged final/ give the same logits (1e-4) and both generate; checkpoints
    leave the frozen base out; tensorboard gets the loss."""
    out, res = lora_run
    assert res[0]["history"] == res[1]["history"] and len(res[0]["history"]) == 6
    cfg = json.load(open(out / "config.json"))
    assert cfg["model"]["curvature"] == "ema" and cfg["model"]["peft"]["r"] == 4
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["curvature"] for m in metrics] == ["ema"] * 6
    assert [m["curvature_ready"] for m in metrics] == [False] + [True] * 5

    base = load_safetensors(cfg["model_path"])
    before, after, trainable = res[0]["before"], res[0]["after"], set(res[0]["trainable"])
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    frozen = [n for n in after if n not in trainable]
    assert {_base_name(n) for n in frozen} == set(base)
    for n in frozen:
        assert torch.equal(after[n], base[_base_name(n)].to(after[n].dtype)), n  # bitwise as loaded
    assert not [n for n in trainable if torch.equal(before[n], after[n])], "adapter tensors that did not train"

    _check_exports(out / "final", cfg["model_path"])
    _check_tensorboard(out / "runs", steps=6)
    # DeepSpeed checkpoints leave the frozen base out: smaller than the base model's weights alone
    size = sum(f.stat().st_size for f in (out / "checkpoints" / "step_000003").rglob("*") if f.is_file())
    assert size < os.path.getsize(os.path.join(cfg["model_path"], "model.safetensors"))


@pytest.mark.timeout(1800)
def test_lora_resume_repeats_the_run(lora_run, runs):
    """--resume auto from the LoRA run's step-3 checkpoint repeats steps 4-6 on both ranks: selections (so the EMA
    curvature came back), losses (so the adapters and their Adam state did)."""
    out, res = lora_run
    part = runs / "lora_resumed"
    os.makedirs(part / "checkpoints")
    shutil.copytree(out / "checkpoints" / "step_000003", part / "checkpoints" / "step_000003")
    res2 = run_distributed(train_body, 2, args=(_argv(part, "--max-steps", "6", "--resume", "auto", "--no-export",
                                                      *LORA),), timeout=1500)
    assert res2[0]["history"] == res2[1]["history"] == res[0]["history"][3:]
    a, b = read_jsonl(out / "metrics.jsonl")[3:], read_jsonl(part / "metrics.jsonl")
    assert [m["step"] for m in b] == [4, 5, 6]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6)


def _check_exports(final, base_path):
    """final/adapter loads with PeftModel.from_pretrained, final/ with plain transformers; same logits; both generate."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(final)
    merged = AutoModelForCausalLM.from_pretrained(final).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), final / "adapter").eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ids = tok("<|user|>Translate: good morning<|assistant|>", return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        la, lb = merged(**ids).logits, adapted(**ids).logits
        torch.testing.assert_close(la, lb, rtol=0, atol=1e-4)
        plain = AutoModelForCausalLM.from_pretrained(base_path).eval()(**ids).logits
        assert (la - plain).abs().max() > 1e-4  # the merge changed the model
        for model in (merged, adapted):
            gen = model.generate(**ids, max_new_tokens=4, do_sample=False)
            assert gen.shape[1] > ids["input_ids"].shape[1]


def _check_tensorboard(runs_dir, steps):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = [os.path.join(runs_dir, d) for d in os.listdir(runs_dir)]
    acc = EventAccumulator(run_dir)
    acc.Reload()
    assert "train/loss" in acc.Tags()["scalars"] and "eval/loss" in acc.Tags()["scalars"]
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, steps + 1))


@pytest.mark.timeout(1200)
def test_lora_with_trained_lm_head_reads_adams_state(runs):
    """--lora-modules-to-save lm_head trains a full copy of the output layer: curvature auto resolves to adam and,
    from the second step (once Adam has state), the features are normalised by it on both ranks."""
    out = runs / "lora_head"
    res = run_distributed(train_body, 2, args=(_argv(out, "--max-steps", "3", "--use-peft", "--lora-modules-to-save",
                                                     "lm_head", "--no-export"),), timeout=1100)
    assert res[0]["history"] == res[1]["history"]
    assert json.load(open(out / "config.json"))["model"]["curvature"] == "adam"
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [(m["curvature"], m["curvature_ready"]) for m in metrics] == [("adam", False), ("adam", True),
                                                                         ("adam", True)]
    assert all(m["time"]["curvature"] > 0 for m in metrics[1:])


SCRIPTED = {1: 3.0, 2: 1.0, 3: 2.0, 4: 2.5, 5: 2.6, 6: 2.7}  # held-out loss per step: the best is step 2


def _scripted_eval_body(rank, world, argv):
    """The real recipe, whose evaluations (real ones, run on every rank) report the held-out losses of SCRIPTED:
    which evaluation is best is then known in advance, and the test checks what the run kept and exported."""
    import optbatch_ds.trainer as trainer

    real = trainer.evaluate

    def scripted(engine, tokenizer, examples, encoded, settings):
        res = real(engine, tokenizer, examples, encoded, settings)
        if res is not None:
            res["loss"] = SCRIPTED[int(engine.global_steps)]
        return res

    trainer.evaluate = scripted
    return train_body(rank, world, argv)


def _small_eval(runs) -> str:
    """2 held-out records per task of the demo set the run trains on: 7 evaluations of the full held-out split
    would cost more than the rest of the test, and the losses are scripted anyway."""
    from optbatch_ds.session import ensure_demo_data

    demo = ensure_demo_data(str(runs / ".optbatch_cache" / "demo_data"))  # where the runs below find it
    records, per_task = [], {}
    for record in read_jsonl(demo["eval"]):
        if per_task.setdefault(record["task"], 0) < 2:
            per_task[record["task"]] += 1
            records.append(record)
    path = runs / "eval_small.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.mark.timeout(1200)
def test_rotation_keeps_n_plus_the_best_and_export_best(runs):
    """--save-total-limit 2 --eval-every 1 --export best, with evaluations whose best is step 2 of 6: exactly the 2
    newest checkpoints plus step 2's remain, final/ holds step 2's weights and eval.json its evaluation."""
    out = runs / "best"
    res = run_distributed(_scripted_eval_body, 2, args=(_argv(out, "--max-steps", "6", "--save-every", "1",
                                                              "--eval-every", "1", "--save-total-limit", "2",
                                                              "--export", "best", "--eval-data", _small_eval(runs)),),
                          timeout=1100)
    assert res[0]["history"] == res[1]["history"]
    history = read_jsonl(out / "eval_history.jsonl")
    assert [(h["step"], h["loss"]) for h in history] == list(SCRIPTED.items())
    kept = sorted(d for d in os.listdir(out / "checkpoints") if d.startswith("step_"))
    assert kept == ["step_000002", "step_000005", "step_000006"]
    evaluation = json.load(open(out / "eval.json"))
    assert evaluation["exported_step"] == 2 and evaluation["loss"] == 1.0 and evaluation["step"] == 2
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    saved = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag="step_000002")
    last = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag="step_000006")
    final = load_safetensors(out / "final")
    assert any(not torch.equal(saved[k], last[k]) for k in final)  # steps 2 and 6 differ: the test can tell
    for k, v in final.items():
        torch.testing.assert_close(v, saved[k].to(v.dtype), rtol=0, atol=1e-6)
