"""Unit tests of step 4 (selection): the pure `select` API first, then the `Selector` wrapper.

Run: python -m pytest tests/unit/test_selection.py -q
"""
import json
import math
import re
from fractions import Fraction

import numpy as np
import pytest
import torch

from optbatch_ds.selection import (METHODS, Candidates, SelectionConfig, SelectionError, SelectionResult, Selector,
                                   mean_nn_distance, select, step_generator)
from optbatch_ds.selection.strata import even_quotas, proportional_quotas

pytestmark = pytest.mark.unit


# ---------------------------------------------------------------- helpers and brute-force references

def make_inputs(seed, c, k, dtype=torch.float64):
    # Offset seed: inputs drawn from the selection's own seed would correlate with its Gumbel noise.
    g = torch.Generator().manual_seed(10_000 + seed)
    losses = torch.rand(c, generator=g, dtype=torch.float64) * 4 + 0.5
    sketches = torch.randn(c, k, generator=g, dtype=torch.float64).to(dtype)
    return losses, sketches


def gen(seed):
    return torch.Generator().manual_seed(seed)


def run(method="optbatch", losses=None, sketches=None, budget=10, seed=0, progress=0.0, **kw):
    return select(Candidates(losses, sketches), budget, SelectionConfig(method=method, seed=seed, **kw), gen(seed),
                  progress=progress)


def ref_strata(losses, k):
    losses = np.asarray(losses, dtype=np.float64)
    order = np.lexsort((np.arange(losses.size), losses))  # by loss, then position
    return [np.sort(g) for g in np.array_split(order, k)]


def ref_quota_counts(losses, groups, budget, tau, weighted, seed):
    """Independent Gumbel-top-k draw from the same generator stream (numpy arithmetic and sort)."""
    losses = np.asarray(losses, dtype=np.float64)
    u = torch.rand(losses.size, generator=gen(seed), dtype=torch.float64).numpy()
    keys = -np.log(-np.log(np.maximum(u, np.finfo(np.float64).tiny)))
    if weighted and math.isfinite(tau):
        keys = keys + losses / tau
    top = np.argsort(-keys, kind="stable")[:budget]
    stratum_of = np.empty(losses.size, dtype=np.int64)
    for s, g in enumerate(groups):
        stratum_of[g] = s
    return np.bincount(stratum_of[top], minlength=len(groups)).tolist()


def ref_dist(x, a, b_rows, distance):
    """float64 distances from row a to rows b_rows, computed directly (no expansion)."""
    x = np.asarray(x, dtype=np.float64)
    if distance == "cosine":
        xa, xb = x[a], x[b_rows]
        return 1 - xb @ xa / (np.linalg.norm(xb, axis=1) * np.linalg.norm(xa))
    return np.linalg.norm(x[b_rows] - x[a], axis=1)


def ref_first_pick(x, members, distance):
    x = np.asarray(x, dtype=np.float64)[members]
    if distance == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = np.linalg.norm(x - x.mean(axis=0), axis=1)
    return members[int(np.argmin(d))]


def check_farthest_picks(picks, losses, sketches, quotas, k_strata, distance, rtol):
    """Every pick is the max-min-distance member of its stratum (recomputed from scratch, float64),
    strata are filled highest-loss first, and the first pick is nearest its stratum's centroid."""
    groups = ref_strata(losses, k_strata)
    order = [s for s in reversed(range(k_strata)) if quotas[s] > 0]
    expected_strata = np.concatenate([[s] * quotas[s] for s in order])
    stratum_of = np.empty(len(losses), dtype=np.int64)
    for s, g in enumerate(groups):
        stratum_of[g] = s
    assert stratum_of[picks].tolist() == expected_strata.tolist()
    assert picks[0] == ref_first_pick(sketches, groups[order[0]], distance)
    chosen = [int(picks[0])]
    for t in range(1, len(picks)):
        members = np.setdiff1d(groups[expected_strata[t]], chosen)
        mind = np.array([ref_dist(sketches, m, chosen, distance).min() for m in members])
        got = mind[np.searchsorted(members, picks[t])]
        assert got >= mind.max() - rtol * max(mind.max(), 1e-12), f"pick {t} is not the farthest"
        chosen.append(int(picks[t]))


def plain_farthest(x, first):
    """Textbook farthest-point sampling (float64, direct distances) from a given first pick."""
    x = np.asarray(x, dtype=np.float64)
    chosen = [first]
    mind = np.linalg.norm(x - x[first], axis=1)
    mind[first] = -np.inf
    return chosen, mind


# ---------------------------------------------------------------- every method: shape, range, determinism

SIZES = [(7, 40, 5, 3), (11, 97, 48, 4), (23, 160, 150, 6)]  # (seed, c, budget, k)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed,c,budget,k", SIZES)
def test_every_method_returns_budget_distinct_positions(method, seed, c, budget, k):
    losses, sketches = make_inputs(seed, c, k, torch.float32)
    budget = c if method == "full" else budget
    res = run(method, losses, sketches, budget, seed)
    assert isinstance(res, SelectionResult)
    assert res.indices.dtype == np.int64 and res.weights.dtype == np.float32
    assert res.indices.shape == (budget,) and res.weights.shape == (budget,)
    assert len(set(res.indices.tolist())) == budget
    assert res.indices.min() >= 0 and res.indices.max() < c
    json.dumps(res.info, allow_nan=False)
    again = run(method, losses, sketches, budget, seed)
    assert np.array_equal(res.indices, again.indices) and np.array_equal(res.weights, again.weights)
    assert res.info == again.info


@pytest.mark.parametrize("method", ["random", "ccs", "infobatch", "optbatch"])
def test_different_seeds_can_differ(method):
    losses, sketches = make_inputs(3, 120, 4)
    results = {tuple(sorted(run(method, losses, sketches, 50, seed).indices.tolist())) for seed in range(6)}
    assert len(results) > 1


def test_numpy_and_torch_inputs_agree():
    losses, sketches = make_inputs(5, 80, 6, torch.float32)
    a = run("optbatch", losses, sketches, 30, 1)
    b = run("optbatch", losses.numpy().astype(np.float32), sketches.numpy(), np.int64(30), 1)
    assert np.array_equal(a.indices, b.indices)


def test_full_returns_everything_in_order_and_needs_budget_c():
    losses, _ = make_inputs(1, 20, 2)
    losses[3] = float("nan")
    res = run("full", losses, None, 20)
    assert res.indices.tolist() == list(range(20)) and res.info["nonfinite"] == 1
    with pytest.raises(ValueError, match="full"):
        run("full", losses, None, 19)


def test_random_is_the_generator_permutation():
    losses, _ = make_inputs(2, 50, 2)
    res = run("random", losses, None, 17, seed=9)
    assert res.indices.tolist() == torch.randperm(50, generator=gen(9))[:17].tolist()


def test_online_hard_takes_top_losses_ties_to_lower_index():
    losses = torch.tensor([1.0, 3.0, 2.0, 3.0, 0.5, 2.0, 3.0])
    res = run("online_hard", losses, None, 4)
    assert res.indices.tolist() == [1, 3, 6, 2]
    losses, _ = make_inputs(4, 200, 2)
    res = run("online_hard", losses, None, 60)
    assert set(res.indices.tolist()) == set(np.argsort(-losses.numpy(), kind="stable")[:60].tolist())


# ---------------------------------------------------------------- optbatch quotas

@pytest.mark.parametrize("tau", [0.3, 1.0, 4.0, float("inf")])
@pytest.mark.parametrize("seed,c,budget,strata", [(0, 90, 40, 3), (1, 200, 150, 5), (2, 31, 31, 2)])
def test_quotas_match_independent_gumbel_top_k(tau, seed, c, budget, strata):
    losses, sketches = make_inputs(seed, c, 4)
    res = run("optbatch", losses, sketches, budget, seed, strata=strata, temperature=tau)
    groups = ref_strata(losses.numpy(), strata)
    quotas = res.info["quotas"]
    assert sum(quotas) == budget
    assert res.info["stratum_sizes"] == [len(g) for g in groups]
    assert all(q <= len(g) for q, g in zip(quotas, groups))
    assert quotas == ref_quota_counts(losses.numpy(), groups, budget, tau, True, seed)
    for s, g in enumerate(groups):  # the picks really are spread like the quotas say
        assert np.isin(res.indices, g).sum() == quotas[s]


def test_large_loss_gap_gives_high_stratum_more():
    losses, sketches = make_inputs(6, 90, 4)
    losses[np.argsort(losses.numpy())[60:]] += 100.0  # top stratum far above the rest
    gap = run("optbatch", losses, sketches, 45, 6, temperature=1.0).info["quotas"]
    flat = run("optbatch", losses, sketches, 45, 6, temperature=float("inf")).info["quotas"]
    assert gap[2] == 30 and gap[2] > flat[2]
    assert sum(gap) == sum(flat) == 45


def test_huge_losses_and_tiny_temperature_stay_finite():
    losses, sketches = make_inputs(8, 60, 4)
    res = run("optbatch", losses * 1e6, sketches, 20, 8, temperature=1e-3)
    assert sum(res.info["quotas"]) == 20 and len(set(res.indices.tolist())) == 20


def test_quota_draw_follows_exp_loss_distribution():
    # One candidate per stratum and budget 1: the quota says which was drawn; P ~ softmax(loss / tau).
    losses = torch.tensor([0.0, 1.0, 2.0])
    n = 2000
    counts = np.zeros(3)
    for seed in range(n):
        counts += run("optbatch", losses, None, 1, seed, strata=3, within="random").info["quotas"]
    p = np.exp(losses.numpy()) / np.exp(losses.numpy()).sum()
    assert np.all(np.abs(counts / n - p) < 4 * np.sqrt(p * (1 - p) / n))


# ---------------------------------------------------------------- optbatch farthest-point fill

@pytest.mark.parametrize("seed,c,budget,strata,k", [(0, 60, 25, 3, 5), (1, 120, 90, 4, 8), (2, 75, 75, 3, 3),
                                                      (3, 50, 12, 1, 16)])
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_every_farthest_pick_is_max_min_distance(seed, c, budget, strata, k, dtype, rtol):
    losses, sketches = make_inputs(seed, c, k, dtype)
    res = run("optbatch", losses, sketches, budget, seed, strata=strata, within="farthest")
    check_farthest_picks(res.indices, losses.numpy(), sketches.numpy(), res.info["quotas"], strata,
                         "euclidean", rtol)


def test_farthest_with_duplicates_and_offset_sketches():
    # Defective data: duplicated samples and sketches far from the origin (precision of the expansion).
    losses, sketches = make_inputs(12, 80, 6, torch.float32)
    sketches[40:60] = sketches[0:20]
    sketches += 1000.0
    res = run("optbatch", losses, sketches, 70, 12, within="farthest")
    assert len(set(res.indices.tolist())) == 70
    check_farthest_picks(res.indices, losses.numpy(), sketches.numpy(), res.info["quotas"], 3,
                         "euclidean", 1e-3)


@pytest.mark.parametrize("seed,c,budget,k", [(0, 40, 15, 4), (1, 100, 60, 12), (2, 64, 64, 2)])
def test_one_stratum_flat_draw_is_plain_farthest_point(seed, c, budget, k):
    losses, sketches = make_inputs(seed, c, k)
    res = run("optbatch", losses, sketches, budget, seed, strata=1, temperature=float("inf"), within="farthest")
    x = sketches.numpy()
    first = ref_first_pick(x, np.arange(c), "euclidean")
    chosen, mind = plain_farthest(x, first)
    while len(chosen) < budget:
        j = int(np.argmax(mind))
        chosen.append(j)
        mind = np.minimum(mind, np.linalg.norm(x - x[j], axis=1))
        mind[chosen] = -np.inf
    assert res.indices.tolist() == chosen


def test_farthest_needs_sketches():
    losses, _ = make_inputs(0, 20, 2)
    with pytest.raises(ValueError, match="within='random'"):
        run("optbatch", losses, None, 5, within="farthest")


# ---------------------------------------------------------------- ablations

def test_within_random_fills_quotas_without_sketches():
    losses, _ = make_inputs(4, 90, 2)
    res = run("optbatch", losses, None, 40, 4, within="random")
    groups = ref_strata(losses.numpy(), 3)
    assert [int(np.isin(res.indices, g).sum()) for g in groups] == res.info["quotas"]
    assert res.info["quotas"] == ref_quota_counts(losses.numpy(), groups, 40, 1.0, True, 4)
    other = run("optbatch", losses, None, 40, 5, within="random")
    assert not np.array_equal(res.indices, other.indices)


def test_uniform_quotas_ignore_losses():
    losses, sketches = make_inputs(6, 90, 4)
    losses[np.argsort(losses.numpy())[60:]] += 100.0
    res = run("optbatch", losses, sketches, 45, 6, quotas="uniform")
    groups = ref_strata(losses.numpy(), 3)
    assert res.info["quotas"] == ref_quota_counts(losses.numpy(), groups, 45, 1.0, False, 6)
    assert res.info["quotas"] == run("optbatch", losses, sketches, 45, 6, temperature=float("inf")).info["quotas"]
    assert res.info["quotas"][2] < 30


@pytest.mark.parametrize("seed,c,budget,strata", [(0, 60, 30, 3), (1, 90, 70, 2)])
def test_cosine_picks_are_max_min_cosine_distance(seed, c, budget, strata):
    losses, sketches = make_inputs(seed, c, 6)
    res = run("optbatch", losses, sketches, budget, seed, strata=strata, distance="cosine", within="farthest")
    check_farthest_picks(res.indices, losses.numpy(), sketches.numpy(), res.info["quotas"], strata, "cosine", 1e-9)
    # Cosine ignores row scale: rescaling rows by powers of two changes nothing.
    scale = 2.0 ** torch.randint(-3, 4, (c, 1), generator=gen(seed)).double()
    again = run("optbatch", losses, sketches * scale, budget, seed, strata=strata, distance="cosine",
                within="farthest")
    assert np.array_equal(res.indices, again.indices)


# ---------------------------------------------------------------- infobatch

@pytest.mark.parametrize("seed,c,budget", [(0, 100, 70), (1, 64, 40), (2, 150, 149)])
def test_infobatch_weights_and_drop_rate(seed, c, budget):
    losses, _ = make_inputs(seed, c, 2)
    res = run("infobatch", losses, None, budget, seed)
    low = losses.numpy() < losses.numpy().mean()
    n_low, n_drop = int(low.sum()), c - budget
    assert n_drop <= n_low  # this case: only low-loss candidates are dropped
    dropped = np.setdiff1d(np.arange(c), res.indices)
    assert low[dropped].all()
    r = n_drop / n_low
    assert res.info["r"] == r
    kept_low = low[res.indices]
    assert np.all(res.weights[kept_low] == np.float32(1.0 / (1.0 - r)))
    assert np.all(res.weights[~kept_low] == 1.0)
    assert res.indices.tolist() == sorted(res.indices.tolist())


def test_infobatch_fewer_low_than_needed_drops_all_low_then_others():
    losses = torch.tensor([0.0, 0.1] + [10.0] * 10)  # 2 below the mean, 10 at or above
    res = run("infobatch", losses, None, 7, 3)
    assert not {0, 1} & set(res.indices.tolist())
    assert res.info["r"] == 1.0 and res.info["dropped_low"] == 2 and res.info["dropped_other"] == 3
    assert np.all(res.weights == 1.0)


def test_infobatch_equal_losses_have_no_low():
    res = run("infobatch", torch.ones(10), None, 6, 0)
    assert res.info["r"] == 0.0 and res.info["low_loss"] == 0 and np.all(res.weights == 1.0)


# ---------------------------------------------------------------- optbatch temperature schedule

@pytest.mark.parametrize("seed,c,budget,tau,tau_end,progress", [
    (0, 60, 40, 1.0, -1.0, 0.0), (1, 60, 40, 1.0, -1.0, 0.25), (2, 60, 40, 1.0, -1.0, 0.5),
    (3, 60, 40, 1.0, -1.0, 1.0), (4, 90, 30, 0.5, 2.0, 0.7), (5, 40, 20, 2.0, math.inf, 0.9),
])
def test_temperature_schedule_quotas_match_reference(seed, c, budget, tau, tau_end, progress):
    losses, sketches = make_inputs(seed, c, 4)
    res = run("optbatch", losses, sketches, budget, seed, temperature=tau, temperature_end=tau_end,
              progress=progress)
    beta = (1 - progress) / tau + progress / tau_end
    eff = 1 / beta if beta != 0 else math.inf
    groups = ref_strata(losses.numpy(), 3)
    assert res.info["quotas"] == ref_quota_counts(losses.numpy(), groups, budget, eff, True, seed)
    assert res.info["inverse_temperature"] == pytest.approx(beta)


def test_temperature_schedule_ends_favouring_low_loss():
    """1/tau from +2 to -2: the first step draws the high-loss stratum most, the last the low-loss one."""
    losses = torch.linspace(0.0, 6.0, 300, dtype=torch.float64)
    sketches = torch.randn(300, 4, generator=gen(0), dtype=torch.float64)
    first = run("optbatch", losses, sketches, 100, 0, temperature=0.5, temperature_end=-0.5, progress=0.0)
    last = run("optbatch", losses, sketches, 100, 0, temperature=0.5, temperature_end=-0.5, progress=1.0)
    assert first.info["quotas"][2] > 80 and first.info["quotas"][0] < 10
    assert last.info["quotas"][0] > 80 and last.info["quotas"][2] < 10
    # without a schedule progress changes nothing
    a = run("optbatch", losses, sketches, 100, 0, progress=0.0)
    b = run("optbatch", losses, sketches, 100, 0, progress=1.0)
    assert np.array_equal(a.indices, b.indices) and "inverse_temperature" not in a.info


def test_selector_progress_runs_from_first_to_last_step():
    sel = Selector(SelectionConfig(temperature_end=-1.0), total_steps=11)
    assert [sel.progress(s) for s in (1, 6, 11, 50)] == [0.0, 0.5, 1.0, 1.0]
    assert Selector(SelectionConfig()).progress(7) == 0.0  # total unknown: the schedule's start


@pytest.mark.parametrize("bad", [0, 0.0, float("nan"), "hot", True])
def test_temperature_end_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="temperature_end"):
        SelectionConfig(temperature_end=bad)


# ---------------------------------------------------------------- optbatch reweight="strata"

@pytest.mark.parametrize("seed,c,budget,strata,within", [(0, 90, 60, 3, "farthest"), (1, 23, 16, 3, "farthest"),
                                                          (2, 200, 60, 5, "random"), (3, 40, 10, 7, "random")])
def test_strata_reweight_is_the_stratified_estimator(seed, c, budget, strata, within):
    losses, sketches = make_inputs(seed, c, 8)
    res = run("optbatch", losses, sketches, budget, seed, strata=strata, within=within, reweight="strata")
    plain = run("optbatch", losses, sketches, budget, seed, strata=strata, within=within)
    # same choice as without reweighting (weights never change what is selected), plain weights are 1
    assert np.array_equal(res.indices, plain.indices) and np.all(plain.weights == 1.0)
    groups = ref_strata(losses.numpy(), strata)
    quotas = res.info["quotas"]
    assert [int(np.isin(res.indices, g).sum()) for g in groups] == quotas
    n = sum(len(g) for g, q in zip(groups, quotas) if q)
    # the weighted batch mean of any per-sample quantity equals the stratified estimate of the pool mean
    x = np.random.default_rng(seed).normal(size=c)
    strat = sum(len(g) / n * x[np.intersect1d(res.indices, g)].mean() for g, q in zip(groups, quotas) if q)
    assert float((res.weights * x[res.indices]).sum() / budget) == pytest.approx(strat, rel=1e-6, abs=1e-9)
    assert float(res.weights.mean()) == pytest.approx(1.0, abs=1e-6)
    for g, q in zip(groups, quotas):
        in_g = np.isin(res.indices, g)
        assert in_g.sum() == q and np.allclose(res.weights[in_g], len(g) / max(q, 1) * budget / n, rtol=1e-6)


def test_upweight_raises_only_under_sampled_strata():
    losses, sketches = make_inputs(7, 23, 8)
    strata = run("optbatch", losses, sketches, 16, 7, reweight="strata")
    up = run("optbatch", losses, sketches, 16, 7, reweight="upweight")
    assert np.array_equal(strata.indices, up.indices)
    assert np.array_equal(up.weights, np.maximum(strata.weights, 1.0).astype(np.float32))
    assert (up.weights > 1).any() and (up.weights == 1).any()


def test_strata_reweight_rejects_unknown_value():
    with pytest.raises(ValueError, match="reweight: 'stratum'.*did you mean 'strata'"):
        SelectionConfig(reweight="stratum")


# ---------------------------------------------------------------- ccs

@pytest.mark.parametrize("seed,c,budget,strata", [(0, 90, 40, 3), (1, 200, 101, 4), (2, 50, 7, 5)])
def test_ccs_spreads_budget_evenly(seed, c, budget, strata):
    losses, _ = make_inputs(seed, c, 2)
    res = run("ccs", losses, None, budget, seed, strata=strata)
    groups = ref_strata(losses.numpy(), strata)
    counts = [int(np.isin(res.indices, g).sum()) for g in groups]
    assert counts == res.info["quotas"] and sum(counts) == budget
    assert max(counts) - min(counts) <= 1
    assert counts == sorted(counts)  # remainder went to the highest-loss strata


def test_ccs_redistributes_when_strata_are_small():
    losses, _ = make_inputs(3, 10, 2)
    res = run("ccs", losses, None, 10, 3, strata=3)  # strata 4, 3, 3 must all be taken whole
    assert res.info["quotas"] == [4, 3, 3]
    assert even_quotas([10, 1, 10], 15) == [7, 1, 7]
    assert even_quotas([2, 9, 3], 12) == [2, 7, 3]
    assert even_quotas([5, 1, 5], 7) == [3, 1, 3]
    assert even_quotas([5, 5, 5], 11) == [3, 4, 4]
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(0, 12, size=rng.integers(1, 6)).tolist()
        if sum(sizes) == 0:
            continue
        budget = int(rng.integers(1, sum(sizes) + 1))
        q = even_quotas(sizes, budget)
        assert sum(q) == budget and all(0 <= a <= s for a, s in zip(q, sizes))
        # Max-min fair: a stratum more than one below another is full.
        assert all(q[a] == sizes[a] or q[a] >= q[b] - 1 for a in range(len(q)) for b in range(len(q)))


# ---------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("method", ["random", "online_hard", "ccs", "infobatch", "optbatch"])
def test_nonfinite_candidates_are_excluded_and_counted(method):
    losses, sketches = make_inputs(9, 60, 4)
    losses[[2, 7]] = float("nan")
    losses[11] = float("inf")
    sketches[20, 1] = float("-inf")
    sketches[33, 0] = float("nan")
    res = run(method, losses, sketches, 40, 9)
    assert res.info["excluded_nonfinite"] == 5
    assert not {2, 7, 11, 20, 33} & set(res.indices.tolist())
    with pytest.raises(SelectionError, match="5 non-finite"):
        run(method, losses, sketches, 56, 9)


def test_bad_budget_and_shapes():
    losses, sketches = make_inputs(0, 20, 3)
    for budget in (0, -1, 21):
        with pytest.raises(ValueError, match="budget"):
            run("random", losses, sketches, budget)
    with pytest.raises(ValueError, match="sketches"):
        run("optbatch", losses, sketches[:19], 5)
    with pytest.raises(ValueError, match="losses"):
        run("random", losses.reshape(4, 5), None, 5)
    with pytest.raises(ValueError, match="strata"):
        run("optbatch", losses[:4], sketches[:4], 2, strata=5)


@pytest.mark.parametrize("field,value", [("method", "optbach"), ("strata", 0), ("strata", 2.5),
                                         ("temperature", 0.0), ("temperature", -1.0), ("temperature", float("nan")),
                                         ("quotas", "exp"), ("within", "nearest"), ("distance", "l2"),
                                         ("seed", "zero")])
def test_invalid_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SelectionConfig(**{field: value})


def test_invalid_method_suggests_nearest():
    with pytest.raises(ValueError, match="optbatch"):
        SelectionConfig(method="optbach")


# ---------------------------------------------------------------- Selector wrapper and diversity metric

def test_selector_is_a_pure_function_of_seed_and_step():
    losses, sketches = make_inputs(1, 100, 6, torch.float32)
    cfg = SelectionConfig(method="optbatch", seed=3)
    a, b = Selector(cfg), Selector(cfg)
    pool = Candidates(losses, sketches)
    r1 = a(5, pool, 40)
    b(4, pool, 40)
    r2 = b(5, pool, 40)
    assert np.array_equal(r1.indices, r2.indices)
    assert np.array_equal(r1.indices, select(Candidates(losses, sketches), 40, cfg, step_generator(3, 5)).indices)
    steps = {tuple(sorted(a(s, pool, 40).indices.tolist())) for s in range(6, 10)}
    assert len(steps) > 1


def test_selector_state_dict_round_trip_and_warning():
    losses, _ = make_inputs(2, 30, 2)
    sel = Selector(SelectionConfig(method="random", seed=1))
    for step in range(3):
        sel(step, Candidates(losses), 10)
    state = json.loads(json.dumps(sel.state_dict()))
    resumed = Selector(SelectionConfig(method="random", seed=1))
    assert resumed.load_state_dict(state) == []  # same settings: nothing to warn about
    assert resumed.state_dict() == sel.state_dict() and resumed.calls == 3
    other = Selector(SelectionConfig(method="ccs", seed=1))
    warned = other.load_state_dict(state)  # returned for the recipe's one warning channel (log0)
    assert len(warned) == 1 and re.search("method.*'random'.*'ccs'", warned[0]), warned


@pytest.mark.parametrize("seed,c,m,k", [(0, 50, 20, 3), (1, 300, 120, 16)])
def test_mean_nn_distance_matches_brute_force(seed, c, m, k):
    _, sketches = make_inputs(seed, c, k, torch.float32)
    idx = np.random.default_rng(seed).choice(c, size=m, replace=False)
    x = sketches.numpy().astype(np.float64)[idx]
    d = np.linalg.norm(x[:, None, :] - x[None, :, :], axis=2)
    np.fill_diagonal(d, np.inf)
    assert mean_nn_distance(sketches, idx) == pytest.approx(d.min(axis=1).mean(), rel=1e-5)
    dup = np.concatenate([idx[:5], idx[:5]])  # positions listed twice are each other's neighbours
    assert mean_nn_distance(sketches.numpy(), dup) == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(mean_nn_distance(sketches, idx[:1]))


def test_chunked_products_give_the_same_answer(monkeypatch):
    import optbatch_ds.selection.farthest as farthest

    losses, sketches = make_inputs(13, 150, 8)
    idx = np.arange(0, 150, 2)
    whole = run("optbatch", losses, sketches, 100, 13)
    nn_whole = mean_nn_distance(sketches, idx)
    monkeypatch.setattr(farthest, "_CHUNK_ELEMS", 7)  # many tiny chunks
    chunked = run("optbatch", losses, sketches, 100, 13)
    assert np.array_equal(whole.indices, chunked.indices)
    assert mean_nn_distance(sketches, idx) == pytest.approx(nn_whole, rel=1e-12)


# ---------------------------------------------------------------------------- outlier fence (improvement)

@pytest.mark.unit
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_outlier_fence_sets_suspects_aside(seed):
    g = torch.Generator().manual_seed(seed)
    c, budget = 40, 28
    losses = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    outliers = torch.randperm(c, generator=g)[:5]
    losses[outliers] += 20.0  # far beyond Q3 + 1.5 IQR
    sketches = torch.randn(c, 8, generator=g)
    sketches[outliers] *= 50  # and far away in sketch space: plain farthest-point would take them first
    cfg = SelectionConfig(method="optbatch", strata=3, outlier_fence=1.5, seed=seed)
    res = select(Candidates(losses, sketches), budget, cfg, torch.Generator().manual_seed(seed))
    assert len(set(res.indices.tolist())) == budget
    assert not set(outliers.tolist()) & set(res.indices.tolist())
    assert res.info["suspects"] == 5 and sum(res.info["quotas"]) == budget
    q1, q3 = np.quantile(losses.numpy(), [0.25, 0.75])
    assert res.info["outlier_fence"] == pytest.approx(q3 + 1.5 * (q3 - q1))
    plain = select(Candidates(losses, sketches), budget, SelectionConfig(method="optbatch", strata=3, seed=seed),
                   torch.Generator().manual_seed(seed))
    assert set(outliers.tolist()) <= set(plain.indices.tolist())  # what the fence prevents


@pytest.mark.unit
def test_outlier_fence_tops_up_with_mildest_suspects():
    losses = torch.tensor([8.0, 1.0, 7.0, 2.0, 3.0, 4.0, 5.0, 6.0], dtype=torch.float64)
    sk = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    res = select(Candidates(losses, sk), 7, SelectionConfig(method="optbatch", strata=2, outlier_fence=0.01),
                 torch.Generator().manual_seed(0))
    assert res.info["outlier_fence"] == pytest.approx(6.25 + 0.01 * 3.5)  # 6 candidates below it
    assert res.indices.tolist() == [1, 3, 4, 5, 6, 7, 2]  # all below the fence, then the mildest suspect


@pytest.mark.unit
@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), True])
def test_outlier_fence_validation(bad):
    with pytest.raises(ValueError, match="outlier_fence"):
        SelectionConfig(outlier_fence=bad)


# ---------------------------------------------------------------- the strata select() reports

@pytest.mark.unit
@pytest.mark.parametrize("method,fence", [("optbatch", 0.0), ("optbatch", 1.5), ("ccs", 0.0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_reported_strata_are_the_strata_used(method, fence, seed):
    """SelectionResult.strata is what the method cut: the loss-quantile strata of the candidates it stratified
    (those below the outlier fence, finite ones only), -1 for the rest; every pick sits in a stratum with a quota,
    and each stratum holds exactly its quota of the picks."""
    c, k, budget = 60, 4, 30
    losses, sketches = make_inputs(seed, c, 6)
    outliers = torch.randperm(c, generator=gen(100 + seed))[:5]
    losses[outliers] += 30.0            # beyond Tukey's fence
    losses[outliers[0]] = math.nan      # and one non-finite candidate
    res = run(method, losses, sketches, budget, seed=seed, strata=k, outlier_fence=fence)
    finite = torch.isfinite(losses)
    stratified = finite.clone()
    if fence:
        q1, q3 = np.quantile(losses[finite].numpy(), [0.25, 0.75])
        stratified &= losses <= q3 + fence * (q3 - q1)
    members = torch.nonzero(stratified).flatten()
    expected = np.full(c, -1)
    for s, g in enumerate(ref_strata(losses[members].numpy(), k)):
        expected[members[g].numpy()] = s
    assert res.strata.dtype == np.int64 and res.strata.shape == (c,)
    assert res.strata.tolist() == expected.tolist()
    picked = res.strata[res.indices]
    assert (picked >= 0).all()
    assert np.bincount(picked, minlength=k).tolist() == res.info["quotas"]
    assert [int((res.strata == s).sum()) for s in range(k)] == res.info["stratum_sizes"]


@pytest.mark.unit
@pytest.mark.parametrize("method", ["random", "online_hard", "infobatch", "full"])
def test_methods_without_strata_report_none(method):
    losses, sketches = make_inputs(3, 20, 4)
    res = run(method, losses, sketches, 20 if method == "full" else 12)
    assert res.strata.tolist() == [-1] * 20


# ---------------------------------------------------------------- strata_by="task": each task keeps its share

def ref_hamilton(sizes, budget):
    """Largest-remainder quotas in exact rational arithmetic: floors, then one each to the largest remainders
    (ties to the lower index)."""
    exact = [Fraction(budget * s, sum(sizes)) for s in sizes]
    quotas = [math.floor(e) for e in exact]
    order = sorted(range(len(sizes)), key=lambda s: (-(exact[s] - quotas[s]), s))
    for s in order[:budget - sum(quotas)]:
        quotas[s] += 1
    return quotas


@pytest.mark.parametrize("seed", range(6))
def test_proportional_quotas_are_largest_remainder(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 40, size=int(rng.integers(1, 7))).tolist()
    budget = int(rng.integers(0, sum(sizes) + 1))
    quotas = proportional_quotas(sizes, budget)
    assert quotas == ref_hamilton(sizes, budget)
    assert sum(quotas) == budget and all(0 <= q <= s for q, s in zip(quotas, sizes))
    assert all(abs(q - Fraction(budget * s, sum(sizes))) < 1 for q, s in zip(quotas, sizes))
    with pytest.raises(ValueError, match="budget"):
        proportional_quotas(sizes, sum(sizes) + 1)


@pytest.mark.parametrize("seed", range(5))
def test_task_strata_keep_each_tasks_share_and_its_top_signal(seed):
    """strata_by="task", within="top" against a plain loop: the finite candidates of each task get a quota in
    proportion to their number, filled by that task's highest signals; non-finite ones are excluded first."""
    rng = np.random.default_rng(seed)
    c = 80
    losses, signal = rng.random(c) * 4, rng.normal(size=c)
    groups = rng.integers(0, 4, size=c) * 3 + 7  # arbitrary ids: the strata are their sorted distinct values
    losses[rng.choice(c, 4, replace=False)] = np.nan
    budget = int(rng.integers(5, 70))
    res = select(Candidates(losses, None, signal, groups), budget,
                 SelectionConfig(strata=1, strata_by="task", within="top"), gen(seed))
    valid = np.isfinite(losses)
    tasks = np.unique(groups[valid])
    quotas = ref_hamilton([int((valid & (groups == t)).sum()) for t in tasks], budget)
    expected, labels = set(), np.full(c, -1)
    for s, (t, q) in enumerate(zip(tasks, quotas)):
        members = np.flatnonzero(valid & (groups == t))
        expected |= set(members[np.argsort(-signal[members], kind="stable")[:q]].tolist())
        labels[members] = s
    assert set(res.indices.tolist()) == expected and len(res.indices) == budget
    assert res.info["quotas"] == quotas
    assert res.strata.tolist() == labels.tolist()


def test_task_strata_without_groups_is_plain_top_k_and_random_within_is_seeded():
    losses, sketches = make_inputs(5, 50, 3)
    signal = -losses
    cfg = SelectionConfig(strata=1, strata_by="task", within="top")
    res = select(Candidates(losses, sketches, signal), 20, cfg, gen(0))
    assert sorted(res.indices.tolist()) == sorted(torch.topk(signal, 20).indices.tolist())
    groups = torch.arange(50) % 3
    cfg = SelectionConfig(strata=1, strata_by="task", within="random", seed=2)
    a, b = (select(Candidates(losses, sketches, signal, groups), 20, cfg, gen(9)) for _ in range(2))
    assert a.indices.tolist() == b.indices.tolist()
    assert np.bincount(groups[a.indices].numpy(), minlength=3).tolist() == a.info["quotas"] == [7, 7, 6]


def test_task_strata_bad_inputs_are_named():
    from optbatch_ds.errors import ConfigError

    with pytest.raises(ConfigError, match=r"strata_by: 'task' makes the tasks the strata; set strata 1 \(got 3\)"):
        SelectionConfig(strata=3, strata_by="task")
    losses, _ = make_inputs(1, 10, 2)
    cfg = SelectionConfig(strata=1, strata_by="task")
    for groups in (torch.zeros(9, dtype=torch.long), torch.zeros(10)):
        with pytest.raises(ValueError, match="groups must be integers of shape"):
            select(Candidates(losses, None, None, groups), 5, cfg, gen(0))
    with pytest.raises(TypeError, match="candidates must be a selection.Candidates"):
        select(losses, 5, cfg, gen(0))
