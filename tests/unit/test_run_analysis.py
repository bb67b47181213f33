"""launch/analyze_run.py's arithmetic: ROC AUC against a brute-force count, per-epoch shares on a tiny run."""
import json

import numpy as np
import pytest

from optbatch_ds.config import ConfigError
from optbatch_ds.bench.analyze_run import analyse, load_run, roc_auc

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_auc_matches_pair_count(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, size=40).astype(float)  # many ties
    pos = rng.random(40) < 0.3
    pairs = [(a, b) for a in scores[pos] for b in scores[~pos]]
    brute = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)
    assert roc_auc(scores, pos) == pytest.approx(brute)


def test_analyse_tiny_run(tmp_path):
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    records = [{"task": "qa", "defect": d, "messages": chat} for d in ("none", "misaligned", "none", "duplicate")]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"train_data": str(data)}))
    lines = [  # 2 candidates a step, 2 steps an epoch, 2 epochs
        {"step": 1, "candidates": [0, 1], "selected": [1], "losses": [0.5, 2.0]},
        {"step": 2, "candidates": [2, 3], "selected": [2], "losses": [1.0, 0.1]},
        {"step": 3, "candidates": [1, 0], "selected": [0], "losses": [0.2, 0.3]},
        {"step": 4, "candidates": [3, 2], "selected": [3], "losses": [0.4, 0.6]},
    ]
    (run / "selection.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    res = analyse(*load_run(str(run)))
    assert res["epochs"] == 2 and res["defective_trained"] == [0.5, 0.0]
    assert res["loss_auc"] == [1.0, 0.0]  # the misaligned record: highest loss, then lowest
    assert res["median_loss"]["qa/clean"] == [0.5, 0.4] and res["median_loss"]["qa/misaligned"] == [2.0, 0.2]


def test_unlabelled_data_is_refused(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n")
    (tmp_path / "config.json").write_text(json.dumps({"train_data": str(data)}))
    (tmp_path / "selection.jsonl").write_text("")
    with pytest.raises(ConfigError, match="no 'task' / 'defect' labels"):
        load_run(str(tmp_path))


def test_truncation_auc_standardises_within_each_task():
    """Two tasks on different loss scales, a wrong answer in each just above its own task's clean losses: the raw
    loss cannot rank the easy task's wrong answer above the hard task's clean records, the per-task one can."""
    from optbatch_ds.bench.analyze_run import signal_aucs

    rng = np.random.default_rng(0)
    tasks = np.array(["easy"] * 20 + ["hard"] * 20)
    loss = np.where(tasks == "easy", 0.2, 2.0) + rng.random(40) * 0.1
    defective = np.zeros(40, bool)
    defective[[0, 20]] = True
    loss[[0, 20]] += 0.5
    out = signal_aucs(loss[None, :], defective, None, tasks)
    assert out["truncation"]["defective"] == [0.0]  # every wrong answer below every clean one: dropped first
    assert out["loss"]["defective"][0] == pytest.approx(0.75)  # raw: easy's wrong answer is below hard's clean ones
    assert "truncation" not in signal_aucs(loss[None, :], defective, None)
