"""Signals, the per-sample store, reference losses by content hash, and dealing a step by length: each against a
plain reference on fresh random inputs.

    python -m pytest tests/unit/test_signals.py -q
"""
import json
import math
import random

import numpy as np
import pytest
import torch

from optbatch_ds.batching import collate, deal_by_length, padded_positions, per_sample_nll
from optbatch_ds.data import load_examples, make_demo_data
from optbatch_ds.data.demo import DemoSpec
from optbatch_ds.data.hashing import record_hash
from optbatch_ds.errors import ConfigError
from optbatch_ds.selection import Candidates, SelectionConfig, select, step_generator
from optbatch_ds.signals import (LOSSES_FILE, ReferenceLosses, SampleStore, SignalConfig, SignalContext,
                                 fill_reference, neighbour_excess, prior_losses, reference_files, robust_standardise,
                                 signal_values, task_groups)

pytestmark = pytest.mark.unit


def test_select_ranks_by_the_signal_and_reports_losses():
    """With a signal, every method sees the signal where it saw the losses; the loss means stay losses."""
    g = torch.Generator().manual_seed(1)
    losses = torch.rand(50, generator=g, dtype=torch.float64) * 3
    signal = torch.randn(50, generator=g, dtype=torch.float64)
    sketches = torch.randn(50, 8, generator=g)
    for method in ("optbatch", "ccs", "online_hard", "infobatch"):
        cfg = SelectionConfig(method=method, seed=4, strata_by="signal")
        with_signal = select(Candidates(losses, sketches, signal), 30, cfg, step_generator(4, 7))
        as_losses = select(Candidates(signal, sketches), 30, cfg, step_generator(4, 7))
        assert with_signal.indices.tolist() == as_losses.indices.tolist(), method
        assert with_signal.strata.tolist() == as_losses.strata.tolist()
        assert with_signal.info["mean_loss_selected"] == pytest.approx(float(losses[with_signal.indices].mean()))
    # strata_by="loss": the strata (and their quotas) are the losses', the choice inside each is by the signal
    cfg = SelectionConfig(method="optbatch", seed=4, strata=3, within="top")
    res = select(Candidates(losses, sketches, signal), 30, cfg, step_generator(4, 7))
    assert res.strata.tolist() == select(Candidates(losses, sketches), 30, cfg, step_generator(4, 7)).strata.tolist()
    for s in range(3):
        members = np.flatnonzero(res.strata == s)
        picked = [i for i in res.indices.tolist() if res.strata[i] == s]
        assert len(picked) == res.info["quotas"][s]
        assert sorted(picked) == sorted(members[np.argsort(-signal[members].numpy(), kind="stable")][:len(picked)])
    signal[3] = math.nan  # a candidate without a signal is excluded like a non-finite loss
    res = select(Candidates(losses, sketches, signal), 30, SelectionConfig(seed=4), step_generator(4, 7))
    assert 3 not in res.indices.tolist() and res.info["excluded_nonfinite"] == 1


def test_reducible_signal_is_loss_minus_reference():
    g = torch.Generator().manual_seed(2)
    reference = np.random.default_rng(2).random(100) * 2
    ids = [5, 17, 99, 0]
    losses = torch.rand(4, generator=g)
    ctx = SignalContext(reference=reference)
    got = signal_values("reducible", losses, None, ids, ctx)
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx([float(losses[j]) - reference[i] for j, i in enumerate(ids)])
    assert signal_values("loss", losses, None, ids, ctx) is None
    filled, missing, mean = fill_reference(np.array([1.0, np.nan, 3.0]))
    assert filled.tolist() == [1.0, 2.0, 3.0] and missing == 1 and mean == 2.0
    with pytest.raises(ConfigError, match="reference_losses"):
        SignalConfig(signal="reducible")


def test_store_keeps_the_last_finite_measurement_and_round_trips():
    """SampleStore against a plain dict of the last finite measurement per index."""
    rng = np.random.default_rng(3)
    n, k = 40, 6
    store, last, first = SampleStore(n, k), {}, {}
    for step in range(1, 30):
        ids = rng.choice(n, size=7, replace=False).tolist()
        losses = torch.from_numpy(rng.random(7).astype(np.float32) * 5)
        sketches = torch.from_numpy(rng.standard_normal((7, k)).astype(np.float32))
        if step % 5 == 0:
            losses[1], sketches[2, 0] = math.nan, math.inf  # not measurements: ignored
        store.record(ids, losses, sketches, step)
        for j, i in enumerate(ids):
            if math.isfinite(float(losses[j])) and torch.isfinite(sketches[j]).all():
                last[i] = (float(losses[j]), sketches[j].clone(), step)
                first.setdefault(i, float(losses[j]))
    got_l, got_s = store.values(list(range(n)))
    for i in range(n):
        if i in last:
            assert float(got_l[i]) == pytest.approx(last[i][0]) and store.step[i] == last[i][2]
            torch.testing.assert_close(got_s[i], last[i][1], rtol=1e-3, atol=1e-3)  # float16 storage
            assert float(store.first_loss[i]) == pytest.approx(first[i])
        else:
            assert math.isnan(float(got_l[i])) and store.step[i] == -1
    state = json.loads(json.dumps({k: (v.tolist() if v is not None else None) for k, v in store.state_dict().items()}))
    again = SampleStore(n, k)
    again.load_state_dict({key: None if v is None else np.asarray(v, dtype=getattr(store, key).dtype)
                           for key, v in state.items()})
    for a, b in zip(store.values(range(n)), again.values(range(n))):
        torch.testing.assert_close(a, b, equal_nan=True)
    assert store.nbytes == n * (2 * k + 12)


def test_reference_losses_match_records_after_the_file_is_shuffled(tmp_path):
    demo = make_demo_data(tmp_path / "demo", seed=0, spec=DemoSpec(n_train=120, n_eval_per_task=2))
    examples = load_examples(demo["train"])
    values = {record_hash(e.messages): 0.01 * i for i, e in enumerate(examples)}
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / LOSSES_FILE).write_text("".join(json.dumps({"hash": h, "loss": v, "model": "clean"}) + "\n"
                                           for h, v in values.items()))
    (ref / "cost.json").write_text(json.dumps({"total_flops": 1e9, "total_wall_s": 2.5}))
    lines = open(demo["train"]).read().splitlines()
    random.Random(0).shuffle(lines)
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("\n".join(lines[:100]) + "\n" + json.dumps({"messages": [
        {"role": "user", "content": "never seen"}, {"role": "assistant", "content": "x"}]}) + "\n")
    loaded = ReferenceLosses.load(str(ref))
    got, unmatched = loaded.for_examples(load_examples(str(shuffled)))
    expect = [values[record_hash(e.messages)] for e in load_examples(str(shuffled))[:100]]
    assert got[:100].tolist() == pytest.approx(expect) and math.isnan(got[100]) and unmatched == 1
    assert loaded.flops == 1e9 and loaded.wall_s == 2.5
    with pytest.raises(ConfigError, match="launch/reference.py"):
        ReferenceLosses.load(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("world,accum,micro", [(1, 1, 16), (2, 1, 8), (2, 3, 4), (4, 2, 2)])
def test_dealing_by_length_keeps_the_samples_and_the_loss(world, accum, micro):
    """The same samples, the same weighted mean loss (the gradient's objective) within 1e-6, less padding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(world * 10 + accum)
    b, vocab = world * accum * micro, 50
    lengths = [int(x) for x in torch.randint(4, 40, (b,))]
    items = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,)).tolist()
        items.append(type("Item", (), {"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})())
    weights = torch.rand(b) + 0.5
    order = deal_by_length(lengths, world, accum)
    assert sorted(order) == list(range(b))
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2)).double()

    def objective(perm):  # what the ranks' micro-batch means add up to, as DeepSpeed averages them
        total = torch.zeros((), dtype=torch.float64)
        for s in range(0, b, micro):
            chunk = perm[s:s + micro]
            batch = collate([items[i] for i in chunk], 0, "cpu")
            per = per_sample_nll(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                 batch["labels"])
            total += (per.double() * weights[chunk].double()).mean() / (world * accum)
        return total

    with torch.no_grad():
        assert float(objective(order)) == pytest.approx(float(objective(list(range(b)))), abs=1e-6)
    dealt = [lengths[i] for i in order]
    assert padded_positions(dealt, micro) <= padded_positions(lengths, micro)
    for a in range(accum):  # the ranks of one accumulation step get neighbouring groups
        groups = [dealt[r * accum * micro + a * micro:r * accum * micro + (a + 1) * micro] for r in range(world)]
        assert max(max(g) for g in groups) - min(min(g) for g in groups) <= max(lengths) - min(lengths)


def test_neighbour_excess_against_brute_force():
    rng = np.random.default_rng(5)
    pool_s, pool_l = rng.standard_normal((200, 12)), rng.random(200) * 3
    cand_s, cand_l = rng.standard_normal((15, 12)), rng.random(15) * 3
    got = neighbour_excess(torch.from_numpy(cand_l), torch.from_numpy(cand_s), pool_l, pool_s, k=7)
    for i in range(15):
        d = np.linalg.norm(pool_s - cand_s[i], axis=1)
        assert float(got[i]) == pytest.approx(cand_l[i] - np.median(pool_l[np.argsort(d)[:7]]))


def test_neighbours_signal_flags_the_sample_out_of_line_with_its_look_alikes():
    """Two clusters of recorded samples, one easy (loss ~0.2) and one hard (~2.0); a candidate in the hard
    cluster with a hard-cluster loss is not flagged, one in the easy cluster with that loss is."""
    rng = np.random.default_rng(0)
    store = SampleStore(400, 8)
    centres = np.stack([np.full(8, -3.0), np.full(8, 3.0)])
    ids = np.arange(400)
    cluster = ids % 2
    sk = centres[cluster] + rng.standard_normal((400, 8)) * 0.3
    loss = np.where(cluster == 0, 0.2, 2.0) + rng.random(400) * 0.1
    store.record(ids, torch.from_numpy(loss.astype(np.float32)), torch.from_numpy(sk.astype(np.float32)), 1)
    cand = [0, 1]  # 0: easy cluster, 1: hard cluster; both now show a loss of 2.0
    losses = torch.tensor([2.0, 2.0])
    sketches = torch.from_numpy(sk[cand].astype(np.float32))
    sig = signal_values("neighbours", losses, sketches, cand, SignalContext(store=store, seed=0, step=3))
    assert float(sig[0]) < -1.5 and abs(float(sig[1])) < 0.2


def test_robust_standardise_against_a_plain_loop():
    rng = np.random.default_rng(11)
    for trial in range(5):
        m, c = int(rng.integers(40, 200)), int(rng.integers(5, 40))
        pool_k = rng.integers(0, 6, m)
        pool_l = rng.gamma(2.0, 1.0 + pool_k, m)       # each key its own scale
        pool_l[rng.random(m) < 0.2] = np.nan            # never measured
        cand_k, cand_l = rng.integers(0, 7, c), rng.gamma(2.0, 1.5, c)   # key 6: nobody recorded
        got = robust_standardise(cand_l, cand_k, pool_l, pool_k, min_count=8)
        for i in range(c):
            ref = [v for v, k in zip(pool_l, pool_k) if k == cand_k[i] and math.isfinite(v)]
            if len(ref) < 8:
                assert math.isnan(got[i])
                continue
            q1, med, q3 = np.quantile(np.array(ref), [0.25, 0.5, 0.75])
            assert got[i] == pytest.approx((cand_l[i] - med) / ((q3 - q1) / 1.349), rel=1e-9), (trial, i)
    got = robust_standardise(np.array([2.0, np.nan]), np.array([0, 0]), np.array([1.0, 1.0, 1.0]), np.zeros(3, int), 2)
    assert got[0] == pytest.approx(1.0) and math.isnan(got[1])   # zero spread counts as 1; NaN stays NaN


def test_truncation_signal_drops_the_least_likely_of_each_task():
    """Two tasks on different loss scales, each with a few outliers: top-k by the truncation signal keeps every
    ordinary record of both tasks and drops the outliers, where top-k by minus the raw loss would drop only the
    hard task's records."""
    rng = np.random.default_rng(3)
    n = 400
    tasks = ["easy" if i % 2 else "hard" for i in range(n)]
    groups = task_groups(iter(tasks))
    assert groups.tolist() == [1 if t == "hard" else 0 for t in tasks]
    loss = np.where(groups == 0, 0.3, 2.0) + rng.random(n) * 0.1
    outliers = np.arange(0, n, 5)                       # 80 records, both tasks, far above their task
    loss[outliers] += 1.0
    store = SampleStore(n, 0)
    store.record(np.arange(n), torch.from_numpy(loss.astype(np.float32)), None, 1)
    ids = np.arange(n)
    sig = signal_values("truncation", torch.from_numpy(loss), None, ids, SignalContext(store=store, groups=groups))
    kept = set(np.argsort(-sig.numpy(), kind="stable")[: n - len(outliers)].tolist())
    assert kept == set(ids.tolist()) - set(outliers.tolist())
    by_raw = set(np.argsort(loss, kind="stable")[: n - len(outliers)].tolist())
    assert by_raw != kept
    # without task labels (one group) the signal is minus the loss standardised over every record
    one = signal_values("truncation", torch.from_numpy(loss), None, ids, SignalContext(store=store))
    assert np.argsort(-one.numpy(), kind="stable").tolist() == np.argsort(loss, kind="stable").tolist()


def test_truncation_judges_a_loss_against_losses_of_its_age():
    """Losses fall over training: a loss recorded early is compared with the others recorded early. A candidate
    never measured gets 0 (its task's median), whatever prior loss it carries; a non-finite loss stays NaN."""
    store = SampleStore(300, 0)
    early, late = np.arange(0, 150), np.arange(150, 298)
    rng = np.random.default_rng(0)
    store.record(early, torch.from_numpy((3.0 + rng.random(150)).astype(np.float32)), None, 1)
    store.record(late, torch.from_numpy((1.0 + rng.random(148)).astype(np.float32)), None, 200)
    ids = np.array([0, 150, 298, 299])            # one early, one late, two never measured
    losses = torch.tensor([3.5, 3.5, 9.0, float("nan")], dtype=torch.float64)
    store.loss[0], store.loss[150] = 3.5, 3.5
    sig = signal_values("truncation", losses, None, ids, SignalContext(store=store, batch=16)).numpy()
    assert abs(sig[0]) < 0.3          # typical of the early records
    assert sig[1] < -3.0              # far above the late records: dropped first
    assert sig[2] == 0.0 and math.isnan(sig[3])


def test_progress_is_zero_on_first_sight_even_with_a_zero_prior():
    """scoring stale with prior mean before anything is measured gives every candidate the prior 0.0: progress
    must be 0 there (first sight), not 1 - 0 / 0."""
    store = SampleStore(10, 0)
    losses = torch.zeros(4, dtype=torch.float64)
    got = signal_values("progress", losses, None, [0, 1, 2, 3], SignalContext(store=store))
    assert got.tolist() == [0.0, 0.0, 0.0, 0.0]
    store.record([0], torch.tensor([2.0]), None, 1)
    got = signal_values("progress", torch.tensor([1.0, 0.0], dtype=torch.float64), None, [0, 1], SignalContext(store=store))
    assert got.tolist() == [0.5, 0.0]


def _prior_loop(recorded, ids, groups, reference):
    """prior_losses written as a plain loop over candidates."""
    out = []
    for i in ids:
        same = [recorded[j] for j in range(len(recorded)) if groups[j] == groups[i] and not math.isnan(recorded[j])]
        known = [x for x in recorded if not math.isnan(x)]
        if same:
            out.append(sum(same) / len(same))
        elif known:
            out.append(sum(known) / len(known))
        elif reference is not None:
            mates = [reference[j] for j in ids if groups[j] == groups[i]]
            out.append(sum(mates) / len(mates))
        else:
            out.append(0.0)
    return np.array(out)


@pytest.mark.parametrize("seed", range(5))
def test_prior_losses_against_a_plain_loop(seed):
    """A never-measured candidate gets its task's mean recorded loss, the global mean where its task has none,
    and before anything is recorded its task's mean reference loss among the candidates (else 0)."""
    rng = np.random.default_rng(seed)
    n = 60
    groups = rng.integers(0, 4, n)
    reference = rng.gamma(2.0, 0.5, n)
    recorded = np.full(n, np.nan, dtype=np.float32)
    ids = rng.choice(n, 20, replace=False)
    groups[ids[0]] = 3
    for ref in (reference, None):  # nothing recorded yet
        np.testing.assert_allclose(prior_losses(recorded, ids, groups, ref), _prior_loop(recorded, ids, groups, ref))
    some = rng.choice(np.flatnonzero(groups != 3), 25, replace=False)  # task 3 never measured
    recorded[some] = rng.gamma(3.0, 0.4, 25).astype(np.float32)
    got = prior_losses(recorded, ids, groups, reference)
    np.testing.assert_allclose(got, _prior_loop(recorded.astype(np.float64), ids, groups, reference), rtol=1e-6)
    assert (groups[ids] == 3).any()  # the fallback to the mean over all tasks is exercised
    # one group (no task field) is the old behaviour: one mean for all
    np.testing.assert_allclose(prior_losses(recorded, ids, None, reference), np.nanmean(recorded.astype(np.float64)),
                               rtol=1e-6)


def test_a_missing_reference_names_what_is_missing(tmp_path):
    """reference_losses pointing nowhere, or at a folder without the losses file: a ConfigError that says which
    (train.py checks it before any data or model loads)."""
    with pytest.raises(ConfigError, match="no such folder or file"):
        reference_files(str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=f"no {LOSSES_FILE} in it"):
        reference_files(str(tmp_path))
    (tmp_path / LOSSES_FILE).write_text("")
    assert reference_files(str(tmp_path)) == (str(tmp_path), str(tmp_path / LOSSES_FILE))
    assert reference_files(str(tmp_path / LOSSES_FILE)) == (str(tmp_path), str(tmp_path / LOSSES_FILE))
