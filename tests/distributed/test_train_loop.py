"""The loop on 2 CPU ranks under ZeRO-3: what every rank saw, what training changed, resume."""
import os
import shutil

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.helpers import load_safetensors, read_jsonl, train_body, zero3_argv as _argv

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("loop")


@pytest.mark.parametrize("method", ["random", "optbatch"])
def test_ranks_agree_and_every_parameter_changes(runs, method):
    out = runs / f"agree_{method}"
    res = run_distributed(train_body, 2, args=(_argv(out, "--method", method, "--max-steps", "4"),), timeout=600)
    assert [r["rank"] for r in res] == [0, 1]
    assert len(res[0]["history"]) == 4 and res[0]["history"] == res[1]["history"]
    sel = read_jsonl(out / "selection.jsonl")
    assert [l["selected"] for l in sel] == res[0]["history"]
    for line in sel:
        assert len(line["selected"]) == 16 and len(set(line["selected"])) == 16
        assert set(line["selected"]) <= set(line["candidates"]) and len(line["candidates"]) == 24
    # every trainable parameter moved away from the initial model
    cfg = __import__("json").load(open(out / "config.json"))
    before = load_safetensors(cfg["model_path"])
    after = load_safetensors(out / "final")
    assert set(before) == set(after)
    unchanged = [k for k in before if torch.equal(before[k].float(), after[k].float())]
    assert not unchanged, f"parameters not trained: {unchanged}"
    assert (out / "eval.json").exists() and (out / "checkpoints" / "step_000004" / "COMPLETE").exists()


def test_resume_repeats_the_uninterrupted_run(runs):
    full = runs / "uninterrupted"
    run_distributed(train_body, 2, args=(_argv(full, "--max-steps", "6", "--save-every", "3"),),
                    timeout=600)
    part = runs / "resumed"
    os.makedirs(part / "checkpoints")
    shutil.copytree(full / "checkpoints" / "step_000003", part / "checkpoints" / "step_000003")
    for name in ("metrics.jsonl", "selection.jsonl"):  # what the killed run had written (plus a stale tail)
        lines = open(full / name).read().splitlines()
        open(part / name, "w").write("\n".join(lines[:4]) + "\n")
    res = run_distributed(train_body, 2, args=(_argv(part, "--max-steps", "6", "--resume", "auto"),),
                          timeout=600)
    assert res[0]["history"] == res[1]["history"] and len(res[0]["history"]) == 3
    a, b = read_jsonl(full / "selection.jsonl"), read_jsonl(part / "selection.jsonl")
    assert [l["step"] for l in b] == [1, 2, 3, 4, 5, 6]
    assert [l["selected"] for l in a] == [l["selected"] for l in b]
    la, lb = read_jsonl(full / "metrics.jsonl"), read_jsonl(part / "metrics.jsonl")
    for x, y in zip(la, lb):
        assert x["step"] == y["step"] and abs(x["loss"] - y["loss"]) <= 1e-6 * max(1.0, abs(x["loss"]))
    wa, wb = load_safetensors(full / "final"), load_safetensors(part / "final")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


def test_temperature_schedule_and_strata_weights_reach_the_training_step(runs, tmp_path):
    """The trainer tells the selector how far training is (1/tau goes 1 -> -1 over 5 steps) and trains with
    the stratified weights it returns; both ranks see the same."""
    cfg = __import__("json").load(open("ds_configs/zero3.json"))
    cfg["optbatch"].update(temperature_end=-1.0, reweight="strata")
    path = tmp_path / "schedule.json"
    path.write_text(__import__("json").dumps(cfg))
    out = runs / "schedule"
    argv = _argv(out, "--max-steps", "5")
    argv[argv.index("ds_configs/zero3.json")] = str(path)
    res = run_distributed(train_body, 2, args=(argv,), timeout=600)
    assert res[0]["history"] == res[1]["history"]
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["inverse_temperature"] for m in metrics] == pytest.approx([1.0, 0.5, 0.0, -0.5, -1.0])
    for line in read_jsonl(out / "selection.jsonl"):
        w = line.get("weights", [1.0] * 16)
        assert len(w) == 16 and sum(w) / 16 == pytest.approx(1.0, abs=1e-5)
