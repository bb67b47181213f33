"""launch/reference.py end to end: the holdout-free variant (two models, each scoring the half it did not train
on; exact duplicates in one half) and the clean variant, then launch/train.py reading the losses by content hash
from a shuffled copy of the training file, with the reference cost counted from step 1."""
import json
import os
import random
import subprocess
import sys

import pytest

from optbatch_ds.reference import DEFAULT_REFERENCE_LR
from tests.helpers import REPO, read_jsonl

pytestmark = pytest.mark.integration

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
WORDS = "apple river stone cloud quick brown fox jumps over lazy dog green blue red small large city house".split()


def _record(rng, i):
    return {"instruction": f"Item {i}: repeat {' '.join(rng.choice(WORDS) for _ in range(3))}",
            "output": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 7))), "task": f"t{i % 2}"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    rng = random.Random(0)
    train = [_record(rng, i) for i in range(40)]
    train.append(dict(train[5]))  # an exact duplicate: must land in the same half as its twin
    clean = [_record(rng, 100 + i) for i in range(24)]
    for name, rows in (("train.jsonl", train), ("clean.jsonl", clean)):
        with open(root / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    shuffled = list(train)
    random.Random(1).shuffle(shuffled)
    with open(root / "shuffled.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in shuffled)
    ds = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                                                    "weight_decay": 0.0}},
          "zero_optimization": {"stage": 3}, "steps_per_print": 10**9,
          "optbatch": {"method": "optbatch", "prune_ratio": 0.3}}
    with open(root / "zero3.json", "w") as f:
        json.dump(ds, f)
    return root


def _launch(script, *args):
    proc = subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


def _hashes(path):
    from optbatch_ds.data import load_examples
    from optbatch_ds.data.hashing import example_hash

    return [example_hash(e) for e in load_examples(str(path))]


def test_holdout_free_reference_scores_each_half_with_the_other_model(data):
    out = data / "refs_free"
    _launch("launch/reference.py", "--data", data / "train.jsonl", "--deepspeed", data / "zero3.json",
            "--model-size", "nano", "--epochs", "1", "--output", out)
    hashes = _hashes(data / "train.jsonl")
    half_a, half_b = set(_hashes(out / "half_a.jsonl")), set(_hashes(out / "half_b.jsonl"))
    assert not half_a & half_b and half_a | half_b == set(hashes)
    assert len(read_jsonl(out / "half_a.jsonl")) + len(read_jsonl(out / "half_b.jsonl")) == 41  # twin kept
    lines = read_jsonl(out / "reference_losses.jsonl")
    assert sorted(l["hash"] for l in lines) == sorted(set(hashes))  # one line per distinct record
    for line in lines:  # never scored by the model that trained on it
        assert line["model"] == ("b" if line["hash"] in half_a else "a")
        assert line["loss"] is not None and 0 < line["loss"] < 20
    cost = json.load(open(out / "cost.json"))
    assert cost["variant"] == "holdout-free" and cost["distinct_records"] == 40 and cost["unscored"] == 0
    assert [p["name"] for p in cost["parts"]] == ["a", "b"]
    for part in cost["parts"]:
        assert part["train_flops"] > 0 and part["score_flops"] > 0 and part["steps"] >= 1
        # wall time counted as the learner's: its steps' own time (the metrics lines' sum), start-up apart
        steps = [m for m in read_jsonl(out / f"ref_{part['name']}" / "metrics.jsonl") if "time" in m]
        assert len(steps) == part["steps"]
        assert part["train_wall_s"] == pytest.approx(sum(m["time"]["total"] for m in steps), abs=1e-4)
        assert part["score_wall_s"] > 0 and part["overhead_wall_s"] > 0
        # the built-in reference learns its small set at the reference rate, not the learner's default
        run_cfg = json.load(open(out / f"ref_{part['name']}" / "config.json"))
        lr = run_cfg["deepspeed"]["optimizer"]["params"]["lr"]
        assert run_cfg["run"]["learning_rate"] == DEFAULT_REFERENCE_LR == lr
    assert cost["total_flops"] == pytest.approx(sum(p["train_flops"] + p["score_flops"] for p in cost["parts"]))
    assert cost["total_wall_s"] == pytest.approx(sum(p["train_wall_s"] + p["score_wall_s"] for p in cost["parts"]))
    assert cost["overhead_wall_s"] == pytest.approx(sum(p["overhead_wall_s"] for p in cost["parts"]))


def test_without_data_the_demo_is_judged_by_its_clean_reference_split(data):
    """No --data: the demo set train.py generates, scored by a model trained on the demo's clean reference split
    (not the holdout-free variant), in the cache beside --output."""
    out = data / "refs_demo"
    _launch("launch/reference.py", "--deepspeed", data / "zero3.json", "--epochs", "0.25", "--output", out)
    cost = json.load(open(out / "cost.json"))
    assert cost["variant"] == "clean" and cost["model_size"] == "nano"
    assert cost["reference_data"] == str(data / ".optbatch_cache" / "demo_data" / "reference.jsonl")
    assert cost["records"] == 3000 and cost["unscored"] == 0 and cost["parts"][0]["records_trained"] == 900
    assert len(read_jsonl(out / "reference_losses.jsonl")) == cost["distinct_records"]


def test_clean_reference_feeds_the_trainer_through_a_shuffled_file(data):
    refs = data / "refs_clean"
    _launch("launch/reference.py", "--data", data / "train.jsonl", "--reference-data", data / "clean.jsonl",
            "--deepspeed", data / "zero3.json", "--model-size", "nano", "--epochs", "1", "--output", refs)
    cost = json.load(open(refs / "cost.json"))
    assert cost["variant"] == "clean" and [p["name"] for p in cost["parts"]] == ["clean"]
    assert cost["parts"][0]["records_trained"] == 24 and cost["parts"][0]["scored"] == 41
    assert {l["model"] for l in read_jsonl(refs / "reference_losses.jsonl")} == {"clean"}

    run = data / "train_out"
    log = _launch("launch/train.py", "--deepspeed", data / "zero3.json", "--data", data / "shuffled.jsonl",
                  "--eval-data", data / "clean.jsonl", "--reference-losses", refs, "--max-steps", "2",
                  "--eval-samples-per-task", "1", "--eval-max-new-tokens", "2", "--log-every", "1",
                  "--output-dir", run)
    assert "41 of 41 records matched by content" in log
    cfg = json.load(open(run / "config.json"))
    summary = cfg["reference"]
    assert summary["matched"] == 41 and summary["unmatched"] == 0
    assert summary["flops"] == pytest.approx(cost["total_flops"])
    section = cfg["optbatch"]
    assert section["preset"] == "reference" and section["signal"] == "reducible" and section["strata"] == 1  # the reference preset
    metrics = read_jsonl(run / "metrics.jsonl")
    assert metrics[0]["flops"] > cost["total_flops"]  # the reference's cost counts from step 1


def test_a_pretrained_base_scores_as_it_is_with_epochs_0(data):
    """--model BASE --epochs 0: no training, one part "base" scoring every record; its losses equal the base's own
    mean answer NLL (scored again here with plain transformers)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optbatch_ds.data import encode_examples, load_examples
    from optbatch_ds.modeling import build_default_model

    examples = load_examples(str(data / "train.jsonl"))
    base = build_default_model([m["content"] for e in examples for m in e.messages], str(data / "base_cache"), seed=3)
    refs = data / "refs_base"
    _launch("launch/reference.py", "--data", data / "train.jsonl", "--deepspeed", data / "zero3.json", "--model", base,
            "--epochs", "0", "--output", refs)
    cost = json.load(open(refs / "cost.json"))
    assert cost["variant"] == "base" and [p["name"] for p in cost["parts"]] == ["base"]
    part = cost["parts"][0]
    assert part["steps"] == 0 and part["train_flops"] == 0 and part["records_trained"] == 0 and part["scored"] == 41
    got = {l["hash"]: l["loss"] for l in read_jsonl(refs / "reference_losses.jsonl")}
    tok, model = AutoTokenizer.from_pretrained(base), AutoModelForCausalLM.from_pretrained(base).eval()
    hashes = _hashes(data / "train.jsonl")
    for enc, h in list(zip(encode_examples(examples, tok, 1024), hashes))[:6]:
        ids, labels = torch.tensor([enc.input_ids]), torch.tensor([enc.labels])
        with torch.no_grad():
            want = model(input_ids=ids, labels=labels).loss.item()
        assert got[h] == pytest.approx(want, rel=1e-4)
    with pytest.raises(AssertionError, match="give --model"):
        _launch("launch/reference.py", "--data", data / "train.jsonl", "--epochs", "0", "--output", data / "no")
