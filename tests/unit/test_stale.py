"""Scoring stale: the selector sees, for every candidate, the loss last measured of it (by a scoring forward
when it was never measured, else by the training forward that last trained it), checked against a plain
bookkeeping of the same run on a tiny model (one process; the engine is a minimal stand-in).

    python -m pytest tests/unit/test_stale.py -q
"""
import pytest
import torch

from optbatch_ds import step as ob_step
from optbatch_ds.batching import collate, per_sample_nll
from optbatch_ds.config import BatchSizes, OptBatchConfig, num_candidates
from optbatch_ds.data import EpochSampler

pytestmark = pytest.mark.unit


class _Engine:
    """What the step functions use of a DeepSpeed engine: module, device, forward, backward, and step(), which
    like DeepSpeed's applies the optimizer only at the gradient-accumulation boundary."""

    def __init__(self, model, accum):
        self.module, self.device, self.accum, self.micro_steps = model, torch.device("cpu"), accum, 0
        self.opt = torch.optim.SGD(model.parameters(), lr=0.5)

    def __call__(self, **kw):
        return self.module(**kw)

    def backward(self, loss):
        (loss / self.accum).backward()

    def step(self):
        self.micro_steps += 1
        if self.micro_steps % self.accum == 0:
            self.opt.step()
            self.opt.zero_grad()


def _items(n, vocab, gen):
    out = []
    for _ in range(n):
        k = int(torch.randint(5, 14, (1,), generator=gen))
        ids = torch.randint(1, vocab, (k,), generator=gen).tolist()
        out.append(type("Item", (), {"input_ids": ids, "labels": [-100] * 2 + ids[2:]})())
    return out


def _tiny_llama(seed: int):
    """(a generator seeded with `seed`, a 1-layer Llama over a 40-token vocabulary initialised under that seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    return gen, LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=2))


@torch.no_grad()
def _plain_losses(model, items, ids):
    if not ids:
        return {}
    batch = collate([items[i] for i in ids], 0, "cpu")
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return dict(zip(ids, per_sample_nll(out.logits, batch["labels"]).tolist()))


@pytest.mark.parametrize("signal,refresh", [("loss", 0.0), ("progress", 0.34)])
def test_stale_values_are_the_last_measurements(signal, refresh):
    gen, model = _tiny_llama(7)
    items = _items(30, 40, gen)
    b, micro, accum = 6, 3, 2
    ob = OptBatchConfig(scoring="stale", refresh=refresh, signal=signal, feature="grad_raw", sketch_dim=8, strata=2)
    sizes = BatchSizes(num_candidates(b, ob.prune_ratio, 1), b, micro, accum, 1)
    rt = ob_step.SelectionRuntime.build(model, ob, sizes, 0, lambda: None, 20, 0)
    rt.attach(len(items))
    engine, sampler, last, first = _Engine(model, accum), EpochSampler(len(items), seed=1), {}, {}
    for step in range(1, 21):
        cand = sampler.draw(sizes.candidates)
        fresh = _plain_losses(model, items, [i for i in cand if i not in last])  # never measured: scored now
        last.update(fresh)
        for i, v in fresh.items():
            first.setdefault(i, v)
        choice = ob_step.choose_batch(rt, engine, items, cand, step, ob_step.new_timers())
        assert choice.losses.tolist() == pytest.approx([last[i] for i in cand], rel=1e-5, abs=1e-6)
        assert choice.score_tokens == sum(len(items[i].input_ids) for i in fresh)
        selected = [cand[p] for p in choice.positions.tolist()]
        if refresh:
            assert choice.info["refreshed"] == round(refresh * b)
        dealt, weights = ob_step.deal(rt, items, selected, choice.weights)
        before = _plain_losses(model, items, dealt)  # what the training forward sees, before the update
        trained = ob_step.train_on(rt, engine, items, *ob_step.my_share(rt, dealt, weights), step)
        ob_step.record_training(rt, dealt, trained, step, ob_step.new_timers())
        assert trained.losses.tolist() == pytest.approx([before[i] for i in dealt], rel=1e-5, abs=1e-6)
        last.update(before)
        for i, v in before.items():
            first.setdefault(i, v)
    assert rt.measured.sum() == len(last)
    assert {i: float(rt.store.first_loss[i]) for i in first} == pytest.approx(first, rel=1e-5)


def test_scoring_in_length_buckets_returns_the_same_scores_in_order():
    from optbatch_ds.scoring import Scorer, SketchProjection

    gen, model = _tiny_llama(3)
    items = _items(23, 40, gen)
    engine = _Engine(model, 1)
    scorer = Scorer("grad_raw", 16, True, SketchProjection(40, 8, seed=0), 4, 0)
    plain = scorer.score(engine, items, None, {"score_forward": 0.0, "features": 0.0})
    bucketed = Scorer("grad_raw", 16, True, SketchProjection(40, 8, seed=0), 4, 0, by_length=True)
    got = bucketed.score(engine, items, None, {"score_forward": 0.0, "features": 0.0})
    torch.testing.assert_close(got[0], plain[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], plain[1], rtol=1e-4, atol=1e-5)
    assert got[2] == plain[2]


def test_stale_store_keeps_unprojected_features():
    """sketch_dim not below the vocabulary (a small model under a config written for a large one): no projection,
    the sketches are the features themselves, and the stale store keeps them (farthest-point filling needs them)."""
    from optbatch_ds.scoring import CurvaturePolicy

    gen, model = _tiny_llama(5)
    items = _items(12, 40, gen)
    ob = OptBatchConfig(scoring="stale", signal="loss", feature="grad_raw", sketch_dim=512, strata=2,
                        within="farthest")
    sizes = BatchSizes(num_candidates(4, ob.prune_ratio, 1), 4, 4, 1, 1)
    rt = ob_step.SelectionRuntime.build(model, ob, sizes, 0, CurvaturePolicy.build(ob, model, adam=None), 5, 0)
    rt.attach(len(items))
    cand = EpochSampler(len(items), seed=0).draw(sizes.candidates)
    choice = ob_step.choose_batch(rt, _Engine(model, 1), items, cand, 1, ob_step.new_timers())
    assert choice.sketches.shape == (len(cand), 40) and len(choice.positions) == 4
    assert rt.scorer.projection is None and rt.store.sketch.shape == (12, 40)


def test_ema_curvature_is_fed_by_the_training_forwards_under_scoring_stale():
    """curvature ema with scoring stale: once every candidate is measured no scoring pass runs, and the statistic
    still moves, from the row statistics of the step's training forwards (one fold per pass: a step with a
    scoring pass folds twice). The step's first read decides `ready`; the statistic goes into the runtime's state
    and comes back from it."""
    from optbatch_ds.scoring import CurvaturePolicy

    gen, model = _tiny_llama(5)
    items = _items(12, 40, gen)
    b, micro, accum = 6, 3, 2
    ob = OptBatchConfig(scoring="stale", signal="loss", feature="grad_curvature", curvature="ema", sketch_dim=8,
                        strata=2, within="farthest")  # farthest: the selection needs the features
    policy = CurvaturePolicy.build(ob, model, adam=None)
    sizes = BatchSizes(num_candidates(b, ob.prune_ratio, 1), b, micro, accum, 1)
    rt = ob_step.SelectionRuntime.build(model, ob, sizes, 0, policy, 12, 0)
    rt.attach(len(items))
    engine, sampler, passes, unscored = _Engine(model, accum), EpochSampler(len(items), seed=1), 0, 0
    assert rt.scorer.wants_curvature
    for step in range(1, 13):
        cand = sampler.draw(sizes.candidates)
        choice = ob_step.choose_batch(rt, engine, items, cand, step, ob_step.new_timers())
        assert policy.ready == (step > 1)  # the identity only before the first pass was folded in
        scored = choice.score_tokens > 0
        unscored += not scored
        dealt, weights = ob_step.deal(rt, items, [cand[p] for p in choice.positions.tolist()], choice.weights)
        before = policy.updates
        trained = ob_step.train_on(rt, engine, items, *ob_step.my_share(rt, dealt, weights), step)
        assert policy.updates == before + 1 and trained.sketches is not None and torch.isfinite(trained.sketches).all()
        passes += 1 + scored
        assert policy.updates == passes
    assert unscored > 0, "the test needs steps where every candidate was measured already"
    again = ob_step.SelectionRuntime.build(model, ob, sizes, 0, CurvaturePolicy.build(ob, model, adam=None), 12, 0)
    again.attach(len(items))
    assert again.load_state_dict(rt.state_dict()) == []
    assert again.curvature.updates == passes
    torch.testing.assert_close(again.curvature.row_scale(), policy.row_scale())


@pytest.mark.parametrize("seed", range(4))
def test_unmeasured_first_ranks_never_measured_above_measured_in_their_own_order(seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    signal = torch.from_numpy(rng.normal(size=40) * 3)
    signal[rng.choice(40, 3, replace=False)] = float("nan")
    unmeasured = rng.random(40) < 0.4
    out = ob_step.unmeasured_first(signal, unmeasured)
    finite = torch.isfinite(signal).numpy()
    new, old = out[torch.from_numpy(unmeasured & finite)], out[torch.from_numpy(~unmeasured & finite)]
    assert float(new.min()) > float(old.max())
    assert torch.equal(out[~torch.from_numpy(unmeasured)].nan_to_num(7.0), signal[~torch.from_numpy(unmeasured)]
                       .double().nan_to_num(7.0))                     # measured ones and NaNs untouched
    order = np.argsort(signal[torch.from_numpy(unmeasured & finite)].numpy(), kind="stable")
    assert np.array_equal(np.argsort(new.numpy(), kind="stable"), order)  # same order among the unmeasured
    assert torch.equal(ob_step.unmeasured_first(signal, np.zeros(40, bool)).nan_to_num(7.0),
                       signal.double().nan_to_num(7.0))


def test_prior_train_keeps_a_pools_never_measured_candidates_first_without_a_forward():
    gen, model = _tiny_llama(3)
    items = _items(30, 40, gen)
    b, micro, accum = 6, 3, 2
    ob = OptBatchConfig(scoring="stale", prior="train", signal="loss", strata=1, within="top", feature="grad_raw",
                        sketch_dim=8, prune_ratio=0.5)
    sizes = BatchSizes(num_candidates(b, ob.prune_ratio, 1), b, micro, accum, 1)
    rt = ob_step.SelectionRuntime.build(model, ob, sizes, 0, lambda: None, 15, 0)
    rt.attach(len(items))
    engine, sampler = _Engine(model, accum), EpochSampler(len(items), seed=2)
    for step in range(1, 16):
        cand = sampler.draw(sizes.candidates)
        new = {i for i in cand if not rt.measured[i]}
        choice = ob_step.choose_batch(rt, engine, items, cand, step, ob_step.new_timers())
        assert choice.score_tokens == 0
        selected = [cand[p] for p in choice.positions.tolist()]
        assert len(new & set(selected)) == min(len(new), b), step
        rest = [i for i in selected if i not in new]  # the measured ones that fill the rest: highest loss first
        old = sorted((i for i in cand if i not in new), key=lambda i: -float(rt.store.loss[i]))
        assert sorted(rest) == sorted(old[:len(rest)])
        dealt, weights = ob_step.deal(rt, items, selected, choice.weights)
        trained = ob_step.train_on(rt, engine, items, *ob_step.my_share(rt, dealt, weights), step)
        ob_step.record_training(rt, dealt, trained, step, ob_step.new_timers())
    assert rt.measured.sum() == 30  # 15 steps x 6 trained of 30 records: every one trained once at least
