"""select(): step 4 of OptBatch and every baseline behind one pure function.

Randomness comes only from the `generator` argument, consumed in a fixed order (a contract the
tests rely on):
  random     torch.randperm(n)
  ccs        torch.randperm(stratum size) per stratum with a quota, highest-loss stratum first
  infobatch  torch.randperm(number of low-loss), then torch.randperm(number of others) if needed
  optbatch   torch.rand(n, dtype=float64) for the Gumbel quota draw, then (within="random")
             torch.randperm(stratum size) per stratum with a quota, highest-loss stratum first
             (within="farthest" and "top" draw nothing more); with strata_by="task" no quota draw,
             only within="random"'s randperm per task group with a quota, highest group id first
where n is the number of valid (finite) candidates. full and online_hard draw nothing.
All work happens on the CPU, whatever device the inputs are on.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from .config import SelectionConfig, SelectionError, SelectionResult
from .farthest import farthest_fill, prepare_sketches
from .strata import even_quotas, exp_loss_quotas, loss_strata, proportional_quotas, task_strata


def _as_cpu_tensor(value, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    try:
        return torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a tensor or array of numbers: {err}") from None


def _check_inputs(losses, sketches, budget):
    loss = _as_cpu_tensor(losses, "losses")
    if loss.dim() != 1:
        raise ValueError(f"losses must have shape (c,), got {tuple(loss.shape)}")
    if not (loss.is_floating_point() or loss.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"losses must be floating point, got dtype {loss.dtype}")
    loss = loss.to(torch.float64)
    c = loss.numel()
    sk = None
    if sketches is not None:
        sk = _as_cpu_tensor(sketches, "sketches")
        if sk.dim() != 2 or sk.shape[0] != c or sk.shape[1] < 1:
            raise ValueError(f"sketches must have shape (c, k) with c={c} (the number of losses) and k >= 1, "
                             f"got {tuple(sk.shape)}")
        if not sk.is_floating_point():
            sk = sk.to(torch.float32)
    if isinstance(budget, (bool, np.bool_)) or not isinstance(budget, (int, np.integer)):
        raise ValueError(f"budget must be an integer, got {budget!r}")
    budget = int(budget)
    if budget < 1 or budget > c:
        raise ValueError(f"budget={budget} must be between 1 and the number of candidates c={c}")
    return loss, sk, budget


def _json_float(value: float):
    value = float(value)
    return value if math.isfinite(value) else None


def _draw_in_strata(groups, quotas, generator) -> torch.Tensor:
    """Random members of each stratum up to its quota, highest-loss stratum first."""
    picks = []
    for s in reversed(range(len(groups))):
        if quotas[s] > 0:
            perm = torch.randperm(groups[s].numel(), generator=generator, device=generator.device).cpu()
            picks.append(groups[s][perm[:quotas[s]]])
    return torch.cat(picks)


def _top_in_strata(signal, groups, quotas) -> torch.Tensor:
    """The highest-signal members of each stratum up to its quota, highest stratum first; ties go to the lower
    position (stable sort)."""
    picks = []
    for s in reversed(range(len(groups))):
        if quotas[s] > 0:
            order = torch.sort(signal[groups[s]], descending=True, stable=True).indices
            picks.append(groups[s][order[:quotas[s]]])
    return torch.cat(picks)


def _random(pool, budget, config, generator, progress):
    perm = torch.randperm(pool.key.numel(), generator=generator, device=generator.device).cpu()
    return perm[:budget], None, {}, None


def _online_hard(pool, budget, config, generator, progress):
    # Stable descending sort keeps equal losses in position order: ties go to the lower index.
    return torch.sort(pool.key, descending=True, stable=True).indices[:budget], None, {}, None


def _stratum_labels(n: int, groups: list[torch.Tensor], members: torch.Tensor | None = None) -> np.ndarray:
    """(n,) int64: the stratum of each of n positions, -1 where none; groups hold positions into
    `members` (a subset of the n) when given, else into the n themselves."""
    labels = np.full(n, -1, dtype=np.int64)
    for s, g in enumerate(groups):
        labels[(g if members is None else members[g]).numpy()] = s
    return labels


def _strata_info(loss, groups, quotas) -> dict:
    return {
        "quotas": [int(q) for q in quotas],
        "stratum_sizes": [int(g.numel()) for g in groups],
        "stratum_loss_ranges": [[float(loss[g].min()), float(loss[g].max())] for g in groups],
    }


def _ccs(pool, budget, config, generator, progress):
    loss = pool.key
    groups = loss_strata(loss, config.strata)
    quotas = even_quotas([g.numel() for g in groups], budget)
    return (_draw_in_strata(groups, quotas, generator), None, _strata_info(loss, groups, quotas),
            _stratum_labels(loss.numel(), groups))


def _infobatch(pool, budget, config, generator, progress):
    """Drop c - budget candidates at random from those below the mean loss; reweight kept low ones.

    If fewer than c - budget candidates are below the mean, all of them are dropped and the rest of
    the drop is drawn at random from the others (at or above the mean), which keep weight 1.
    r = low dropped / low; kept low-loss candidates get weight 1 / (1 - r).
    """
    loss = pool.key
    n = loss.numel()
    threshold = float(loss.mean())
    is_low = loss < threshold
    low = torch.nonzero(is_low).flatten()
    other = torch.nonzero(~is_low).flatten()
    n_drop = n - budget
    perm = torch.randperm(low.numel(), generator=generator, device=generator.device).cpu()
    drop_low = low[perm[:n_drop]]
    drop_other = other[:0]
    if n_drop > low.numel():
        perm = torch.randperm(other.numel(), generator=generator, device=generator.device).cpu()
        drop_other = other[perm[:n_drop - low.numel()]]
    keep = torch.ones(n, dtype=torch.bool)
    keep[drop_low] = False
    keep[drop_other] = False
    kept = torch.nonzero(keep).flatten()
    ratio = drop_low.numel() / low.numel() if low.numel() else 0.0
    weights = np.ones(budget, dtype=np.float32)
    if ratio < 1.0:
        weights[is_low[kept].numpy()] = 1.0 / (1.0 - ratio)
    info = {
        "r": ratio,
        "drop_rate": ratio,  # same value under the name the trainer logs
        "mean_loss_threshold": threshold,
        "low_loss": int(low.numel()),
        "dropped_low": int(drop_low.numel()),
        "dropped_other": int(drop_other.numel()),
    }
    return kept, weights, info, None


def loss_fence(loss: torch.Tensor, k: float) -> float:
    """Tukey's upper fence Q3 + k IQR of the pool's losses (inf when k = 0: no fence)."""
    if k <= 0:
        return math.inf
    q1, q3 = torch.quantile(loss.to(torch.float64), torch.tensor([0.25, 0.75], dtype=torch.float64)).tolist()
    return q3 + k * (q3 - q1)


def _optbatch(pool, budget, config, generator, progress):
    """Strata, exp(loss) quotas and farthest-point filling (DESIGN §2 step 4).

    `pool.key` is what the within-stratum choice "top" ranks by (the losses without a signal); the strata, their
    quotas and the fence are cut on it too, or on the raw losses with strata_by="loss", or (strata_by="task") the
    strata are the candidates' task groups with quotas in proportion to their sizes. With an outlier fence,
    candidates above it are set aside first: in instruction data the extreme losses are mostly defects
    (misaligned or truncated answers), which exp(loss) quotas would favour and farthest-point selection would
    seek out as outliers. They fill the budget, lowest first, only when the others cannot."""
    loss = pool.loss if config.strata_by == "loss" else pool.key
    fence = loss_fence(loss, config.outlier_fence)
    inside = torch.nonzero(loss <= fence).flatten()
    suspects = torch.nonzero(loss > fence).flatten()
    extra = {"outlier_fence": _json_float(fence), "suspects": int(suspects.numel())}
    if inside.numel() < budget:  # not enough below the fence: keep them all, top up with the mildest suspects
        order = torch.sort(loss[suspects], stable=True).indices
        return torch.cat([inside, suspects[order[:budget - inside.numel()]]]), None, extra, None
    sub_loss = loss[inside]
    info = {}
    if config.strata_by == "task":
        groups = task_strata(None if pool.groups is None else pool.groups[inside], inside.numel())
        quotas = proportional_quotas([g.numel() for g in groups], budget)
    else:
        # the fence may leave fewer candidates than strata; without a fence that is the caller's error
        strata = min(config.strata, inside.numel()) if config.outlier_fence > 0 else config.strata
        groups = loss_strata(sub_loss, strata)
        beta = config.inverse_temperature(progress)
        tau = 1.0 / beta if beta != 0 else math.inf
        quotas = exp_loss_quotas(sub_loss, groups, budget, tau, config.quotas == "exp_loss", generator)
        if config.temperature_end is not None:
            info["inverse_temperature"] = beta
    if config.within == "farthest":
        picks = farthest_fill(prepare_sketches(pool.sketches[inside], config.distance), groups, quotas)
    elif config.within == "top":
        picks = _top_in_strata(pool.key[inside], groups, quotas)
    else:
        picks = _draw_in_strata(groups, quotas, generator)
    info.update(_strata_info(sub_loss, groups, quotas))
    if config.outlier_fence > 0:
        info.update(extra)
    weights = None
    if config.reweight != "none":
        weights = stratum_weights(groups, quotas, picks)
        if config.reweight == "upweight":
            weights = np.maximum(weights, 1.0)
    return inside[picks], weights, info, _stratum_labels(loss.numel(), groups, inside)


def stratum_weights(groups: list[torch.Tensor], quotas: list[int], picks: torch.Tensor) -> np.ndarray:
    """Stratified-sampling weights of the picked positions: w = (n_s / q_s) / (n / b), mean exactly 1.

    With n_s members and q_s picks in stratum s (n and b in all), sum_i w_i x_i / b is the stratified
    estimator sum_s (n_s / n) mean_{picked in s} x of the mean of x over all n candidates: each
    stratum counts as much as its share of the pool, however many of its members the quotas took.
    A stratum without a quota cannot be represented: n counts only the strata with one."""
    b = int(picks.numel())
    n = sum(int(g.numel()) for g, q in zip(groups, quotas) if q > 0)
    weight_of = {}
    for g, q in zip(groups, quotas):
        if q > 0:
            weight_of.update(dict.fromkeys(g.tolist(), (g.numel() / q) * (b / n)))
    return np.array([weight_of[i] for i in picks.tolist()], dtype=np.float64)


_METHODS = {
    "random": _random,
    "online_hard": _online_hard,
    "ccs": _ccs,
    "infobatch": _infobatch,
    "optbatch": _optbatch,
}


def _everything(loss: torch.Tensor, finite: torch.Tensor, budget: int, info: dict) -> SelectionResult:
    """Method "full": every candidate, in order, finite or not (info["nonfinite"] counts the others)."""
    c = loss.numel()
    if budget != c:
        raise ValueError(f"method 'full' trains on every candidate: budget={budget} must equal c={c}")
    mean = _json_float(loss[finite].mean()) if bool(finite.any()) else None
    info.update(excluded_nonfinite=0, nonfinite=int((~finite).sum()), mean_loss_candidates=mean,
                mean_loss_selected=mean)
    return SelectionResult(np.arange(c, dtype=np.int64), np.ones(c, dtype=np.float32), info,
                           np.full(c, -1, dtype=np.int64))


class Candidates(NamedTuple):
    """The c candidates of one pool, as `select` takes them.

    losses: (c,) per-candidate loss (float; nats per token for the trainer's).
    sketches: (c, k) per-candidate sketch, or None for methods that do not use them (optbatch with
        within="farthest" needs them).
    signal: (c,) what the methods rank by (strata, quotas, top-k, infobatch's mean threshold) instead of the
        losses, e.g. the reducible loss (`optbatch_ds.signals`); None = the losses.
    groups: (c,) int task group of each candidate (strata_by="task"); None = one group.
    """

    losses: object
    sketches: object = None
    signal: object = None
    groups: object = None


class _Pool(NamedTuple):
    """The valid candidates, checked: float64 losses and ranking key (c',), sketches (c', k) or None, int64
    groups (c',) or None."""

    loss: torch.Tensor
    key: torch.Tensor
    sketches: torch.Tensor | None
    groups: torch.Tensor | None


def _check_groups(groups, c: int) -> torch.Tensor | None:
    if groups is None:
        return None
    g = _as_cpu_tensor(groups, "groups")
    if g.shape != (c,) or g.is_floating_point() or g.is_complex():
        raise ValueError(f"groups must be integers of shape (c,) = ({c},) like the losses, got {tuple(g.shape)} "
                         f"{g.dtype}")
    return g.to(torch.int64)


def select(candidates: Candidates, budget: int, config: SelectionConfig, generator: torch.Generator | None,
           progress: float = 0.0) -> SelectionResult:
    """Choose `budget` of the c `candidates` (see `Candidates` for their shapes).

    info's mean_loss_* always report losses, whatever the signal.
    Candidates whose loss, signal or any sketch entry is NaN/inf are excluded first and counted in
    info["excluded_nonfinite"]; if fewer than `budget` remain, SelectionError. `full` is not a selection: it
    needs budget == c and returns every candidate in order, finite or not (info["nonfinite"] counts them).
    progress: the fraction of training done, in [0, 1]; only optbatch's temperature schedule
    (temperature_end) reads it.
    Returns positions 0..c-1 into the candidate arrays, and each candidate's stratum; see SelectionResult.
    Raises ValueError on malformed inputs (shapes, dtypes, budget) and TypeError on a config or candidates of
    the wrong type.
    """
    if not isinstance(config, SelectionConfig):
        raise TypeError(f"config must be a SelectionConfig, got {type(config).__name__}")
    if not isinstance(candidates, Candidates):
        raise TypeError(f"candidates must be a selection.Candidates, got {type(candidates).__name__}")
    loss, sk, budget = _check_inputs(candidates.losses, candidates.sketches, budget)
    c = loss.numel()
    signal = candidates.signal
    key = loss if signal is None else _check_inputs(signal, None, budget)[0]
    if key.numel() != c:
        raise ValueError(f"signal must have shape (c,) = ({c},) like the losses, got {tuple(key.shape)}")
    groups = _check_groups(candidates.groups, c)
    finite = torch.isfinite(loss) & torch.isfinite(key)
    if sk is not None:
        finite &= torch.isfinite(sk).all(dim=1)
    info = {"method": config.method, "candidates": c, "budget": budget}
    if config.method == "full":
        return _everything(loss, finite, budget, info)

    if config.method == "optbatch" and config.within == "farthest" and sk is None:
        raise ValueError("method 'optbatch' with within='farthest' needs sketches of shape (c, k); got None "
                         "(pass sketches, or set SelectionConfig.within='random')")
    if generator is None and config.method != "online_hard":
        raise ValueError(f"method {config.method!r} draws at random: pass a torch.Generator")

    valid = torch.nonzero(finite).flatten()
    excluded = c - valid.numel()
    if valid.numel() < budget:
        raise SelectionError(
            f"only {valid.numel()} of {c} candidates have a finite loss, signal and sketch ({excluded} non-finite); "
            f"cannot select budget={budget}")
    pool = _Pool(loss[valid], key[valid], None if sk is None else sk[valid], None if groups is None else groups[valid])
    local, weights, extra, local_strata = _METHODS[config.method](pool, budget, config, generator, progress)
    indices = valid[local]
    strata = np.full(c, -1, dtype=np.int64)
    if local_strata is not None:
        strata[valid.numpy()] = local_strata
    if weights is None:
        weights = np.ones(budget, dtype=np.float32)
    info.update(excluded_nonfinite=int(excluded),
                mean_loss_candidates=_json_float(loss[valid].mean()),
                mean_loss_selected=_json_float(loss[indices].mean()))
    info.update(extra)
    return SelectionResult(indices.numpy().astype(np.int64), weights.astype(np.float32), info, strata)
