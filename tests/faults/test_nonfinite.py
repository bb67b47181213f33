"""Non-finite values on 2 CPU ranks: excluded from selection when scoring, fatal (on every rank) when training.

    python -m pytest tests/faults/test_nonfinite.py -q

The faults are injected by monkeypatching, inside each rank, the functions the shared step looks up at
call time (`optbatch_ds.scoring.features.output_layer_features` for scoring, `optbatch_ds.batching.per_sample_nll`
for the training loss), then running the real recipe (`tests.helpers.train_body`). `optbatch_ds.batching.collate`
is wrapped too, only to learn which dataset indices (`Encoded.index`) sit in the batch being poisoned.
"""
import math
import re
import time

import pytest

from tests.dist_utils import run_distributed
from tests.faults.test_bad_input import small_inputs
from tests.helpers import read_jsonl, train_body

pytestmark = pytest.mark.distributed

NAN_STEP = 3         # the step whose training loss turns NaN, on rank 1 only
POISON_ROW = 1       # row of the batch that is poisoned


@pytest.fixture(scope="module")
def data_args(root):
    return small_inputs(root, 200)["args"]  # 200 demo records: a short setup, several steps per epoch


def _argv(out, data_args, *extra, config="ds_configs/zero2.json"):
    return ["--deepspeed", config, "--method", "optbatch", "--output-dir", str(out),
            "--log-every", "0", "--no-export", *data_args, *extra]


def _fresh_scoring_config(root) -> str:
    """zero2.json with scoring "fresh": one scoring forward per step, the path the poisoned-scores test targets
    (with "stale", the training forward computes the recorded values too, through the same function)."""
    import json

    cfg = json.load(open("ds_configs/zero2.json"))
    cfg["optbatch"]["scoring"] = "fresh"
    path = root / "zero2_fresh.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def _record_batches(batching):
    """Wrap batching.collate so the test knows the dataset indices of the batch being built."""
    seen = {"batch": []}
    original = batching.collate

    def collate(encoded, pad_id, device):
        seen["batch"] = [e.index for e in encoded]
        return original(encoded, pad_id, device)

    batching.collate = collate
    return seen


def _poisoned_scores_body(rank, world_size, argv):
    import optbatch_ds.batching as batching
    import optbatch_ds.scoring.features as features

    seen = _record_batches(batching)
    original = features.output_layer_features
    poisoned = []  # (scoring call, dataset index) on this rank

    def output_layer_features(hidden, logits, labels, **kw):
        losses, feats = original(hidden, logits, labels, **kw)
        # rank 0 poisons a feature (inf), rank 1 a loss (NaN): both must be excluded
        if rank == 0:
            feats[POISON_ROW, 0] = math.inf
        else:
            losses[POISON_ROW] = math.nan
        poisoned.append(seen["batch"][POISON_ROW])
        return losses, feats

    features.output_layer_features = output_layer_features
    res = train_body(rank, world_size, argv)
    return {"poisoned": poisoned, "history": res["history"]}


def test_nonfinite_candidates_are_excluded_and_counted(root, data_args):
    out = root / "nonfinite_scores"
    steps = 3
    argv = _argv(out, data_args, "--max-steps", str(steps), config=_fresh_scoring_config(root))
    res = run_distributed(_poisoned_scores_body, 2, args=(argv,), timeout=600)
    # one scoring call per step per rank (12 candidates per rank fit one scoring batch of 16)
    assert [len(r["poisoned"]) for r in res] == [steps, steps]
    assert res[0]["history"] == res[1]["history"]
    sel, metrics = read_jsonl(out / "selection.jsonl"), read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    for s in range(steps):
        bad = {res[0]["poisoned"][s], res[1]["poisoned"][s]}
        assert bad <= set(sel[s]["candidates"]), "the poisoned samples were candidates of this step"
        assert not bad & set(sel[s]["selected"]), f"step {s + 1}: a non-finite candidate was selected"
        assert len(sel[s]["selected"]) == 16 and metrics[s]["excluded_nonfinite"] == 2
        assert all(math.isfinite(m) for m in (metrics[s]["loss"], metrics[s]["mean_loss_selected"]))
    print("poisoned", [r["poisoned"] for r in res], "excluded_nonfinite", [m["excluded_nonfinite"] for m in metrics])


def _nan_training_loss_body(rank, world_size, argv):
    import torch

    import optbatch_ds.batching as batching
    import optbatch_ds.step as step

    seen = _record_batches(batching)
    original = batching.per_sample_nll
    calls, bad = [0], []

    def per_sample_nll(logits, labels):
        per = original(logits, labels)
        calls[0] += 1  # one training micro-batch per step (gradient_accumulation_steps 1)
        if rank == 1 and calls[0] == NAN_STEP:
            bad.append(seen["batch"][POISON_ROW])
            per = torch.where(torch.arange(len(per)) == POISON_ROW, torch.full_like(per, math.nan), per)
        return per

    batching.per_sample_nll = per_sample_nll
    t0 = time.monotonic()
    try:
        train_body(rank, world_size, argv)
    except step.NonFiniteLossError as exc:
        return {"error": type(exc).__name__, "message": str(exc), "bad": bad, "seconds": time.monotonic() - t0}
    return {"error": None, "bad": bad}


def test_nonfinite_training_loss_stops_every_rank(root, data_args):
    out = root / "nonfinite_loss"
    res = run_distributed(_nan_training_loss_body, 2,
                          args=(_argv(out, data_args, "--max-steps", "6", "--save-every", "2"),), timeout=600)
    assert [r["error"] for r in res] == ["NonFiniteLossError"] * 2, res
    bad = res[1]["bad"]
    assert len(bad) == 1
    last_good = out / "checkpoints" / "step_000002"
    for r in res:
        assert r["message"] == res[0]["message"]
        m = re.fullmatch(r"non-finite training loss at step (\d+) \(samples \[(.*)\]\); last good checkpoint: (.*)",
                         r["message"])
        assert m, r["message"]
        assert int(m.group(1)) == NAN_STEP and m.group(2) == str(bad[0]) and m.group(3) == str(last_good)
    assert (last_good / "COMPLETE").exists()
    # nothing past the last good step was written as if it had trained
    assert [l["step"] for l in read_jsonl(out / "metrics.jsonl")] == list(range(1, NAN_STEP))
    assert not (out / "checkpoints" / f"step_{NAN_STEP:06d}").exists()
    print(res[0]["message"], "| seconds to raise:", [round(r["seconds"], 1) for r in res])
