"""The "optbatch" keys beyond the paper on 2 CPU ranks under ZeRO-3: every rank trains what rank 0 chose, and a
run resumed from a checkpoint with scoring "stale" (the recorded losses and sketches come back from it) chooses
exactly as the uninterrupted run.

    python -m pytest tests/distributed/test_selection_keys.py -q
"""
import json
import os
import shutil

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.faults.test_bad_input import small_inputs
from tests.helpers import load_safetensors, read_jsonl, train_body

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    inputs = small_inputs(root, 60)  # 60 records: 2 pools of 24 per epoch, so stale values are reused
    from optbatch_ds.data import load_examples
    from optbatch_ds.data.hashing import record_hash

    ref = root / "ref"
    ref.mkdir()
    examples = load_examples(inputs["data"])
    gen = torch.Generator().manual_seed(0)
    (ref / "reference_losses.jsonl").write_text("".join(
        json.dumps({"hash": record_hash(e.messages), "loss": float(torch.rand(1, generator=gen)) * 3, "model": "t"})
        + "\n" for e in examples[:-5]))  # 5 records unmatched: they get the mean
    (ref / "cost.json").write_text(json.dumps({"total_flops": 5e9, "total_wall_s": 1.5}))
    return root, inputs, ref


def _config(root, name, **keys):
    cfg = json.load(open("ds_configs/zero3.json"))
    cfg["optbatch"].update(keys)
    path = root / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def _argv(config, out, inputs, *extra):
    return ["--deepspeed", config, "--output-dir", str(out), "--log-every", "0", "--eval-samples-per-task", "1",
            "--eval-max-new-tokens", "2", *inputs["args"], *extra]


CASES = {
    "stale_neighbours_top": dict(scoring="stale", signal="neighbours", strata=1, within="top", refresh=0.125),
    "reducible_mean_prior": dict(scoring="stale", signal="reducible", prior="mean", strata=1, within="top"),
    "reducible_train_prior": dict(scoring="stale", signal="reducible", prior="train", strata=1, within="top"),
    "reducible_by_task": dict(scoring="stale", signal="reducible", prior="mean", strata=1, strata_by="task",
                              within="top"),
    "progress_fresh": dict(signal="progress", within="random"),
    "truncation_mean_prior": dict(scoring="stale", signal="truncation", prior="mean", strata=1, within="top"),
    "paper_preset": dict(preset="paper"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_ranks_agree_on_every_new_key(setup, case):
    root, inputs, ref = setup
    keys = dict(CASES[case])
    if keys.get("signal") == "reducible":
        keys["reference_losses"] = str(ref)
    out = root / case
    res = run_distributed(train_body, 2, args=(_argv(_config(root, case, **keys), out, inputs, "--max-steps", "6"),),
                          timeout=600)
    assert res[0]["history"] == res[1]["history"] and len(res[0]["history"]) == 6
    sel, metrics = read_jsonl(out / "selection.jsonl"), read_jsonl(out / "metrics.jsonl")
    assert [l["selected"] for l in sel] == res[0]["history"]
    for line in sel:
        assert len(set(line["selected"])) == 16 and set(line["selected"]) <= set(line["candidates"])
    cfg = json.load(open(out / "config.json"))
    if keys.get("signal") == "reducible":  # the reference's cost counts from step 0
        assert cfg["reference"]["matched"] == 55 and cfg["reference"]["unmatched"] == 5
        assert metrics[0]["flops"] > 5e9 and metrics[0]["reference_flops"] == 5e9
    if keys.get("scoring") == "stale":  # a forward only for candidates never measured (in no earlier pool)
        seen: set = set()
        for line, m in zip(sel, metrics):
            new = set(line["candidates"]) - seen
            assert (m["score_tokens"] > 0) == (bool(new) and keys.get("prior", "fresh") == "fresh"), (m["step"], len(new))
            seen |= set(line["candidates"])
        assert any(m["score_tokens"] == 0 for m in metrics) or keys.get("prior", "fresh") != "fresh"
    if keys.get("refresh"):  # 12.5% of the budget drawn at random from what the selector left
        assert all(m["refreshed"] == 2 for m in metrics)
    if keys.get("prior") == "train":  # a pool's never-trained candidates are kept before any trained one
        trained: set = set()
        for line in sel:
            new = set(line["candidates"]) - trained
            assert len(new & set(line["selected"])) == min(len(new), 16), line["step"]
            trained |= set(line["selected"])
    if keys.get("strata_by") == "task":  # each task keeps its share of the pool (largest remainder)
        from optbatch_ds.data import load_examples
        from optbatch_ds.selection.strata import proportional_quotas

        task = [e.task for e in load_examples(inputs["data"])]
        for line, m in zip(sel, metrics):
            names = sorted({task[i] for i in line["candidates"]})
            sizes = [sum(task[i] == t for i in line["candidates"]) for t in names]
            assert m["quotas"] == proportional_quotas(sizes, 16) == [sum(task[i] == t for i in line["selected"])
                                                                    for t in names]
    if case == "paper_preset":
        assert cfg["optbatch"]["within"] == "farthest" and cfg["optbatch"]["signal"] == "loss"


def test_stale_resume_repeats_the_uninterrupted_run(setup):
    root, inputs, _ = setup
    config = _config(root, "stale_resume", scoring="stale", signal="neighbours", strata=1, within="top", refresh=0.125)
    full = root / "stale_full"
    run_distributed(train_body, 2, args=(_argv(config, full, inputs, "--max-steps", "6", "--save-every", "3"),),
                    timeout=600)
    part = root / "stale_resumed"
    os.makedirs(part / "checkpoints")
    shutil.copytree(full / "checkpoints" / "step_000003", part / "checkpoints" / "step_000003")
    res = run_distributed(train_body, 2, args=(_argv(config, part, inputs, "--max-steps", "6", "--resume", "auto"),),
                          timeout=600)
    assert res[0]["history"] == res[1]["history"] and len(res[0]["history"]) == 3
    a, b = read_jsonl(full / "selection.jsonl"), read_jsonl(part / "selection.jsonl")
    assert [l["selected"] for l in a[3:]] == [l["selected"] for l in b]
    assert [l["losses"] for l in a[3:]] == [l["losses"] for l in b]  # the recorded values came back
    wa, wb = load_safetensors(full / "final"), load_safetensors(part / "final")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
