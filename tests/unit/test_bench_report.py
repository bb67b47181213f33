"""The benchmark report's arithmetic: compute at equal quality, plateau detection, mean ± std."""
import math

import pytest

from optbatch_ds.bench.io import mean_std
from optbatch_ds.bench.report import full_cost_to_reach, paired_differences, plateau_epoch, plateau_note

pytestmark = pytest.mark.unit

CURVE = [{"epoch": e, "loss": l, "flops": f, "wall_s": w}
         for e, l, f, w in ((1, 2.0, 100.0, 10.0), (2, 1.0, 200.0, 20.0), (3, 0.8, 300.0, 30.0), (4, 0.9, 400.0, 40.0))]


@pytest.mark.parametrize("loss,flops,wall", [
    (2.5, 100.0, 10.0),   # above the first evaluation: reached there (nothing earlier is known)
    (2.0, 100.0, 10.0),
    (1.5, 150.0, 15.0),   # halfway between 2.0 and 1.0
    (0.9, 250.0, 25.0),   # first crossing, not the later 0.9 at epoch 4
    (0.8, 300.0, 30.0),
])
def test_full_cost_to_reach_interpolates_the_first_crossing(loss, flops, wall):
    assert full_cost_to_reach(CURVE, loss) == pytest.approx((flops, wall))


def test_full_cost_to_reach_is_nan_below_full_best_and_without_data():
    assert all(math.isnan(x) for x in full_cost_to_reach(CURVE, 0.79))
    assert all(math.isnan(x) for x in full_cost_to_reach([], 1.0))
    assert all(math.isnan(x) for x in full_cost_to_reach(CURVE, float("nan")))


def test_plateau_epoch_is_where_loss_stays_within_tolerance_of_best():
    assert plateau_epoch(CURVE, tol=0.01) == 3      # the best; the rise after it (overfitting) does not matter
    assert plateau_epoch(CURVE, tol=0.3) == 2       # 1.0 is within 30% of 0.8
    assert plateau_epoch(CURVE[:1]) is None
    assert "stopped improving" in plateau_note(CURVE) and "0.8000 at epoch 3" in plateau_note(CURVE)
    assert "still improving" in plateau_note(CURVE[:3])


def test_mean_std_is_sample_std_and_skips_nan():
    m, sd = mean_std([1.0, 2.0, 3.0, float("nan"), None])
    assert m == 2.0 and sd == pytest.approx(1.0)
    m, sd = mean_std([5.0])
    assert m == 5.0 and math.isnan(sd)


def test_paired_differences_match_by_seed():
    def row(label, method, ratio, seed, loss, status="ok", ablation=""):
        return {"label": label, "method": method, "prune_ratio": ratio, "seed": seed, "heldout_loss": loss,
                "status": status, "ablation": ablation}
    rows = [row("full", "full", 0.0, 0, 1.0), row("full", "full", 0.0, 1, 2.0),
            row("random", "random", 0.3, 0, 1.5), row("random", "random", 0.3, 1, 2.6),
            row("optbatch", "optbatch", 0.3, 0, 1.2), row("optbatch", "optbatch", 0.3, 1, 2.2),
            row("optbatch", "optbatch", 0.3, 2, 9.0),                      # no full / random seed 2: unpaired
            row("optbatch", "optbatch", 0.5, 0, 1.4, status="failed")]    # failed runs are left out
    by = {(p["label"], p["prune_ratio"]): p for p in paired_differences(rows)}
    assert set(by) == {("random", 0.3), ("optbatch", 0.3)}
    o = by[("optbatch", 0.3)]
    assert o["n_full"] == 2 and o["vs_full"] == pytest.approx(0.2) and o["vs_full_std"] == pytest.approx(0.0, abs=1e-12)
    assert o["n_random"] == 2 and o["vs_random"] == pytest.approx(-0.35)
    assert by[("random", 0.3)]["n_random"] == 0 and by[("random", 0.3)]["vs_full"] == pytest.approx(0.55)


def test_trained_mix_counts_wrong_answers_shares_and_right_answers_never_trained(tmp_path):
    """Against a hand count: 6 labelled records, a 2-step selection log; a duplicate is a right answer."""
    import json

    from optbatch_ds.bench.report import trained_mix

    labels = [("qa", "none"), ("qa", "misaligned"), ("qa", "none"), ("chat", "none"), ("chat", "truncated"),
              ("chat", "duplicate")]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"task": t, "defect": d, "messages": [
        {"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}) + "\n"
        for i, (t, d) in enumerate(labels)))
    (tmp_path / "config.json").write_text(json.dumps({"train_data": str(data)}))
    (tmp_path / "selection.jsonl").write_text(json.dumps({"selected": [0, 1, 3]}) + "\n"
                                              + json.dumps({"selected": [0, 4]}) + "\n")
    mix = trained_mix(str(tmp_path))
    assert mix.defective == pytest.approx(2 / 5)               # records 1 and 4 of the 5 trained
    assert mix.shares == pytest.approx({"chat": 2 / 5, "qa": 3 / 5})
    assert mix.untrained == pytest.approx({"chat": 1 / 2, "qa": 1 / 2})  # right answers: qa 0, 2; chat 3, 5
    (tmp_path / "config.json").write_text(json.dumps({}))      # no labelled data: nothing to say
    empty = trained_mix(str(tmp_path))
    assert math.isnan(empty.defective) and empty.shares == {} and empty.untrained == {}
