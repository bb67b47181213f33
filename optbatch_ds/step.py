"""DESIGN §2 steps 2-6 for one pool of candidates: the OptBatch step that every entry point shares.

launch/train.py (`trainer.Recipe.train_step`), the Hugging Face Trainer integration (`hf_trainer`) and
offline pruning (`offline`) call these functions on every rank, around one `SelectionRuntime` built
once per run:

    rt = SelectionRuntime.build(engine.module, optbatch, sizes, pad_id, curvature, total_steps, rank)
    rt.attach(num_samples, reference, groups)                          # per-sample state (stale scoring, signals)
    choice = choose_batch(rt, engine, dataset, candidates, step, timers)   # 2-5: score, gather, select, broadcast
    trained = train_on(rt, engine, dataset, my_ids, my_weights, step)      # 6: forward, backward, optimizer step
    record_training(rt, selected, trained, step)                           # stale: what training measured

Selection (`rt.selector`, a pure function of seed and step) runs on rank 0 only; every collective is
one of `comm`'s. The step 1 draw (`data.EpochSampler`) and the bookkeeping around a step stay with the
caller, since each entry point owns its loop.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from optbatch_ds import batching, comm
from optbatch_ds.batching import deal_by_length, padded_shard
from optbatch_ds.config import BatchSizes, OptBatchConfig
from optbatch_ds.scoring.features import RowCurvature
from optbatch_ds.scoring.forward import LmHeadInput, Scorer
from optbatch_ds.selection import Candidates, Selector, mean_nn_distance, step_generator
from optbatch_ds.signals import STORE_SIGNALS, SampleStore, SignalContext, prior_losses, signal_values

# The parts of a step, timed apart (seconds), in the order they run; metrics.jsonl's "time" has each.
TIME_PARTS = ("draw", "curvature", "score_forward", "features", "gather", "select", "broadcast", "train",
              "diagnostics")
# The selector's info keys that go into metrics.jsonl (the rest stays in selection.jsonl or is dropped).
LOGGED_INFO = ("mean_loss_candidates", "mean_loss_selected", "quotas", "stratum_sizes", "diversity_kept",
               "diversity_random", "excluded_nonfinite", "drop_rate", "suspects", "outlier_fence",
               "inverse_temperature", "refreshed")
# Seed stride of the diagnostic random subset (a prime, like the selector's own stride, so (seed, step)
# pairs do not collide); the subset only measures diversity and never changes what is trained.
_DIAGNOSTIC_STRIDE = 7919
# Seed offset of the refresh draw (scoring stale): its own stream, apart from the selection's at that step.
_REFRESH_SEED = 104_729


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite: stopping beats training on garbage."""


def new_timers() -> dict[str, float]:
    """A fresh {part: 0.0} for every part of TIME_PARTS."""
    return dict.fromkeys(TIME_PARTS, 0.0)


@dataclass
class SelectionRuntime:
    """What the OptBatch step needs that does not change between steps (built once per run, every rank).

    curvature: a collective callable returning 1 / sqrt(v_hat + eps), (V, d), or None (no Adam state yet), or a
    `scoring.CurvaturePolicy` (which may also return a RowCurvature: the ema policy, fed by every forward that
    computes features); read at most once per step (`inv_sqrt_v`), and only when the features need it.
    reference: the reference loss of every dataset index (signal reducible), NaN filled; rank 0 only.
    groups: the task group of every dataset index (signal truncation), int (N,), or None (one group); rank 0 only.
    store: recorded losses and sketches per dataset index (scoring stale); rank 0 only.
    measured: per dataset index, whether the store holds a value; identical on every rank (each rank knows
    what was trained and scored, so no communication keeps it in step).
    """

    optbatch: OptBatchConfig
    selector: Selector
    scorer: Scorer
    sizes: BatchSizes
    rank: int
    curvature: Callable[[], torch.Tensor | None]
    reference: np.ndarray | None = None
    groups: np.ndarray | None = None
    store: SampleStore | None = None
    measured: np.ndarray | None = None
    group_by_length: bool = False   # deal each step's samples to ranks and micro-batches by length (`share`)
    _curvature_step: tuple = (None, None)

    @classmethod
    def build(cls, module, optbatch: OptBatchConfig, sizes: BatchSizes, pad_id: int,
              curvature: Callable[[], torch.Tensor | None], total_steps: int | None, rank: int) -> "SelectionRuntime":
        """module: the model being trained (its lm_head sizes the sketch projection); total_steps: the planned
        optimizer steps (training progress for a temperature schedule; None if unknown)."""
        scorer = Scorer.build(module, optbatch, pad_id, sizes.micro_batch_size)
        return cls(optbatch, Selector(optbatch.selection_config(), total_steps=total_steps), scorer, sizes, rank,
                   curvature)

    def attach(self, num_samples: int, reference: np.ndarray | None = None, groups: np.ndarray | None = None) -> None:
        """The per-sample state of a dataset of `num_samples` indices: the reference losses and task groups (rank 0
        keeps them) and, with scoring stale, the store (rank 0) and the measured flags (every rank)."""
        if self.rank == 0:
            self.reference, self.groups = reference, groups
        if self.optbatch.stale or self.optbatch.signal in STORE_SIGNALS:
            self.measured = np.zeros(num_samples, dtype=bool)
            if self.rank == 0:
                # without a projection (sketch_dim 0, or not below the vocabulary) the features themselves
                self.store = SampleStore(num_samples, self.scorer.sketch_size)

    def groups_of(self, ids: list) -> np.ndarray | None:
        """Rank 0: the task group of each dataset index in `ids` (int (len(ids),)), or None without groups."""
        return self.groups[ids] if self.groups is not None else None

    @property
    def pad_id(self) -> int:
        return self.scorer.pad_id

    def inv_sqrt_v(self, step: int, timers: dict) -> torch.Tensor | None:
        """The curvature for this step's features, read once per step (collective; the same call on every rank)."""
        if not self.scorer.wants_curvature:
            return None
        if self._curvature_step[0] != step:
            t0 = time.perf_counter()
            self._curvature_step = (step, self.curvature())
            timers["curvature"] += time.perf_counter() - t0
        return self._curvature_step[1]

    def state_dict(self) -> dict:
        """What resume needs beyond the selector (a pure function of seed and step): the store and flags, and the
        curvature policy's running statistic (ema)."""
        curvature = self.curvature.state_dict() if hasattr(self.curvature, "state_dict") else None
        return {"store": self.store.state_dict() if self.store is not None else None,
                "measured": self.measured, "curvature": curvature}

    def load_state_dict(self, state: dict) -> list[str]:
        """Restore `state_dict()`; returns warnings (a checkpoint written with another curvature source)."""
        if self.store is not None and state.get("store") is not None:
            self.store.load_state_dict(state["store"])
        if self.measured is not None and state.get("measured") is not None:
            self.measured = state["measured"]
        if hasattr(self.curvature, "load_state_dict"):
            return self.curvature.load_state_dict(state.get("curvature"))
        return []


class Scores(NamedTuple):
    """Steps 2-3: every candidate's loss and sketch on rank 0 (None elsewhere, and None when not scored)."""

    losses: torch.Tensor | None
    sketches: torch.Tensor | None
    tokens: int              # tokens this rank's scoring forwards processed
    curvature: bool          # whether the features were normalised by Adam's second moment


class Choice(NamedTuple):
    """What steps 2-5 decided, identical on every rank: positions into the candidate list and weights;
    the selector's info and the gathered losses / sketches (rank 0 only, else {} / None)."""

    positions: torch.Tensor
    weights: torch.Tensor
    info: dict
    losses: torch.Tensor | None
    sketches: torch.Tensor | None
    score_tokens: int
    curvature: bool
    strata: torch.Tensor | None = None  # each candidate's stratum (-1: none), rank 0 only


def pass_curvature(rt: SelectionRuntime, step: int, timers: dict):
    """The curvature for one pass of forwards that compute features: the step's (read once per step), except that
    the ema policy gives each pass a fresh RowCurvature (it collects that pass's row statistics) holding the
    statistic as it stands, with every earlier pass folded in (local: no collective)."""
    norm = rt.inv_sqrt_v(step, timers)
    return rt.curvature.rows() if isinstance(norm, RowCurvature) else norm


def fold_curvature(rt: SelectionRuntime, norm, timers: dict) -> bool:
    """After a pass: the ema policy folds its row statistics in (collective: every rank calls it after the same
    pass). Returns whether the pass's features were curvature-normalised."""
    if not isinstance(norm, RowCurvature):
        return norm is not None
    t0 = time.perf_counter()
    rt.curvature.after_scoring(norm)
    timers["curvature"] += time.perf_counter() - t0
    return norm.scale is not None


def score_and_gather(rt: SelectionRuntime, engine, items: list, timers: dict, step: int = 0) -> Scores:
    """Steps 2-3: score this rank's candidates `items` with the model, gather (loss, sketch) to rank 0.
    Collective: every rank calls it with the same number of items."""
    inv_sqrt_v = pass_curvature(rt, step, timers)
    losses, sketches, tokens = rt.scorer.score(engine, items, inv_sqrt_v, timers)
    normalised = fold_curvature(rt, inv_sqrt_v, timers)
    t0 = time.perf_counter()
    all_losses = comm.gather_to_rank0(losses)
    all_sketches = comm.gather_to_rank0(sketches) if sketches is not None else None
    timers["gather"] += time.perf_counter() - t0
    return Scores(all_losses, all_sketches, tokens, normalised)


def _fresh_scores(rt: SelectionRuntime, engine, dataset, cand: list, step: int, timers: dict) -> Scores:
    """Scoring fresh: every candidate scored now, rank r its contiguous c / W slice."""
    cpr = rt.sizes.candidates_per_rank
    scores = score_and_gather(rt, engine, [dataset[i] for i in cand[rt.rank * cpr:(rt.rank + 1) * cpr]], timers, step)
    if rt.store is not None:
        rt.store.record(cand, scores.losses, scores.sketches, step)
    return scores


def _stale_scores(rt: SelectionRuntime, engine, dataset, cand: list, step: int, timers: dict) -> Scores:
    """Scoring stale: recorded values; the candidates never measured are scored now (all ranks know which), or
    with prior "mean" or "train" get their task's mean loss measured so far (`signals.prior_losses`; no forward)."""
    need = [i for i in cand if not rt.measured[i]]
    tokens, curvature = 0, False
    if need and rt.optbatch.prior in ("mean", "train"):
        if rt.rank == 0:
            losses, sketches = rt.store.values(cand)
            unmeasured = torch.isnan(losses)
            prior = torch.from_numpy(prior_losses(rt.store.loss, np.asarray(cand), rt.groups, rt.reference))
            losses[unmeasured] = prior.to(losses.dtype)[unmeasured]
            return Scores(losses, sketches if rt.scorer.with_features else None, 0, False)
        return Scores(None, None, 0, False)
    if need:
        rank, world = comm.rank_and_world()
        fresh = score_and_gather(rt, engine, [dataset[i] for i in padded_shard(need, rank, world)], timers, step)
        tokens, curvature = fresh.tokens, fresh.curvature
        rt.measured[need] = True
        if rt.rank == 0:
            sketches = fresh.sketches[:len(need)] if fresh.sketches is not None else None
            rt.store.record(need, fresh.losses[:len(need)], sketches, step)
    if rt.rank != 0:
        return Scores(None, None, tokens, curvature)
    losses, sketches = rt.store.values(cand)
    return Scores(losses, sketches if rt.scorer.with_features else None, tokens, curvature)


def _select(rt: SelectionRuntime, scores: Scores, cand: list, step: int):
    """Rank 0: positions (b,), weights (b,), info and strata of step 4, plus the refresh draw (scoring stale)."""
    ob, c, b = rt.optbatch, rt.sizes.candidates, rt.sizes.train_batch_size
    refresh = int(round(ob.refresh * b)) if ob.stale else 0
    losses = scores.losses if ob.needs_scores else torch.zeros(c)
    ctx = SignalContext(rt.reference, rt.store, ob.seed, step, rt.groups, b)
    signal = signal_values(ob.signal, losses, scores.sketches, cand, ctx) if ob.needs_scores else None
    if ob.stale and ob.prior == "train":
        signal = unmeasured_first(signal if signal is not None else losses, ~rt.measured[cand])
    result = rt.selector(step, Candidates(losses, scores.sketches, signal, rt.groups_of(cand)), b - refresh)
    positions = torch.as_tensor(result.indices, dtype=torch.long)
    weights = torch.as_tensor(result.weights, dtype=torch.float32)
    info = dict(result.info)
    if refresh:
        rest = torch.ones(c, dtype=torch.bool)
        rest[positions] = False
        pool = torch.nonzero(rest).flatten()
        gen = step_generator(ob.seed + _REFRESH_SEED, step)
        extra = pool[torch.randperm(len(pool), generator=gen)[:refresh]]
        positions, weights = torch.cat([positions, extra]), torch.cat([weights, torch.ones(refresh)])
        info["refreshed"] = refresh
    return positions, weights, info, torch.as_tensor(result.strata)


def unmeasured_first(signal: torch.Tensor, unmeasured: np.ndarray) -> torch.Tensor:
    """Prior "train": the (c,) signal with the never-measured candidates (bool (c,)) shifted above every measured
    one, their order among themselves kept; unchanged when all or none are unmeasured. Non-finite values stay."""
    shifted = signal.clone().to(torch.float64)
    mask = torch.from_numpy(np.asarray(unmeasured, dtype=bool))
    finite = torch.isfinite(shifted)
    new, old = shifted[mask & finite], shifted[~mask & finite]
    if len(new) and len(old):
        shifted[mask & finite] += float(old.max() - new.min()) + 1.0
    return shifted


def choose_batch(rt: SelectionRuntime, engine, dataset, cand: list, step: int, timers: dict) -> Choice:
    """Steps 2-5 for one pool: score the candidates `cand` (dataset indices, the same list on every rank; methods
    that never look at the samples skip this), gather to rank 0, select b of the c there, broadcast, check every
    rank holds the same. Collective. Raises comm.DisagreementError on every rank if the ranks end up holding
    different batches."""
    ob, b = rt.optbatch, rt.sizes.train_batch_size
    if not ob.needs_scores:
        scores = Scores(None, None, 0, False)
    elif ob.stale:
        scores = _stale_scores(rt, engine, dataset, cand, step, timers)
    else:
        scores = _fresh_scores(rt, engine, dataset, cand, step, timers)
    t0 = time.perf_counter()
    positions = weights = strata = None
    info: dict = {}
    if rt.rank == 0:
        positions, weights, info, strata = _select(rt, scores, cand, step)
    timers["select"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    positions = comm.broadcast_from_rank0(positions, (b,), torch.long)
    weights = comm.broadcast_from_rank0(weights, (b,), torch.float32)
    comm.check_agreement(torch.cat([positions.double(), weights.double()]), step=step)
    timers["broadcast"] = time.perf_counter() - t0
    return Choice(positions, weights, info, scores.losses, scores.sketches, scores.tokens, scores.curvature, strata)


def diversity(rt: SelectionRuntime, choice: Choice, step: int) -> dict:
    """Rank 0 diagnostics: the mean nearest-neighbour sketch distance of the kept set and of a random subset of
    the same size (how much diversity the choice bought). {} without sketches; never changes the choice."""
    if choice.sketches is None:
        return {}
    finite = torch.isfinite(choice.sketches).all(1) & torch.isfinite(choice.losses)
    pool = torch.nonzero(finite).flatten()
    gen = torch.Generator().manual_seed(rt.optbatch.seed * _DIAGNOSTIC_STRIDE + step)
    rnd = pool[torch.randperm(len(pool), generator=gen)[:rt.sizes.train_batch_size]].numpy()
    return {"diversity_kept": float(mean_nn_distance(choice.sketches, choice.positions.numpy())),
            "diversity_random": float(mean_nn_distance(choice.sketches, rnd))}


def deal(rt: SelectionRuntime, dataset, selected: list, weights: torch.Tensor) -> tuple[list, torch.Tensor]:
    """The step's `selected` samples (dataset indices) and weights in the order ranks train them: rank r takes the
    r-th contiguous b / W slice (`my_share`). Dealt by length (`batching.deal_by_length`) when
    rt.group_by_length, else as selected. Same on every rank; the same samples and weights either way."""
    if not rt.group_by_length:
        return selected, weights
    order = deal_by_length([len(dataset[i].input_ids) for i in selected], rt.sizes.world, rt.sizes.grad_accum)
    return [selected[p] for p in order], weights[torch.as_tensor(order)]


def my_share(rt: SelectionRuntime, ids: list, weights: torch.Tensor) -> tuple[list, torch.Tensor]:
    """This rank's contiguous slice of a dealt step (`deal`)."""
    bpr = rt.sizes.batch_per_rank
    mine = slice(rt.rank * bpr, (rt.rank + 1) * bpr)
    return ids[mine], weights[mine]


class Trained(NamedTuple):
    """Step 6 on one rank: the sum of per-sample losses, the tokens trained, and (scoring stale) what the training
    forwards measured of each trained sample, in training order: losses (n,) and sketches (n, k) or None."""

    loss_sum: float
    tokens: int
    positions: int                            # token positions of the padded micro-batches (tokens + padding)
    losses: torch.Tensor | None = None
    sketches: torch.Tensor | None = None
    feature_s: float = 0.0


def train_on(rt: SelectionRuntime, engine, dataset, ids: list, weights: torch.Tensor, step: int,
             last_ckpt: str | None = None) -> Trained:
    """Step 6: forward, backward and optimizer step on this rank's share `ids` (indices into `dataset`, with
    their loss weights), micro-batch by micro-batch as the DeepSpeed config says. With scoring stale, the
    closed-form loss and sketch of each trained sample are computed from the same forward (its lm_head input and
    logits, no graph), so the selector can use them later. Raises NonFiniteLossError on every rank together."""
    micro, measure = rt.sizes.micro_batch_size, rt.optbatch.stale
    inv_sqrt_v = pass_curvature(rt, step, {"curvature": 0.0}) if measure else None
    loss_sum, train_tokens, positions, losses, sketches, feature_s = 0.0, 0, 0, [], [], 0.0
    capture = LmHeadInput(engine.module) if measure else None
    try:
        for m in range(rt.sizes.grad_accum):
            mids = ids[m * micro:(m + 1) * micro]
            batch = batching.collate([dataset[i] for i in mids], rt.pad_id, engine.device)
            train_tokens += int(batch["attention_mask"].sum())
            positions += batch["attention_mask"].numel()
            outp = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            per = batching.per_sample_nll(outp.logits, batch["labels"])
            loss = (per * weights[m * micro:(m + 1) * micro].to(per.device)).mean()
            if comm.any_rank(not bool(torch.isfinite(loss))):
                bad = comm.all_gather_objects([i for i, v in zip(mids, per.tolist()) if not math.isfinite(v)])
                raise NonFiniteLossError(
                    f"non-finite training loss at step {step} (samples {sorted(sum(bad, []))}); "
                    f"last good checkpoint: {last_ckpt or 'none'}")
            if measure:
                t0 = time.perf_counter()
                with torch.no_grad():
                    l, f = rt.scorer.signals(capture.value.detach(), outp.logits.detach(), batch["labels"], inv_sqrt_v)
                losses.append(l.float().cpu())
                sketches.append(f.float().cpu() if f is not None else None)
                feature_s += time.perf_counter() - t0
            engine.backward(loss)
            engine.step()
            loss_sum += float(per.detach().sum())
    finally:
        if capture is not None:
            capture.remove()
    if not measure:
        return Trained(loss_sum, train_tokens, positions)
    fold_curvature(rt, inv_sqrt_v, {"curvature": 0.0})  # ema: the training forwards' statistics too (collective)
    sk = torch.cat(sketches) if sketches and sketches[0] is not None else None
    return Trained(loss_sum, train_tokens, positions, torch.cat(losses), sk, feature_s)


def record_training(rt: SelectionRuntime, trained_ids: list, trained: Trained, step: int, timers: dict) -> None:
    """Scoring stale: gather what every rank's training forwards measured and record it on rank 0; every rank
    marks the samples measured. `trained_ids`: the step's samples in rank order (what `deal` returned), the order
    the gathered measurements come in. Collective."""
    if trained.losses is None:
        return
    t0 = time.perf_counter()
    losses = comm.gather_to_rank0(trained.losses)
    sketches = comm.gather_to_rank0(trained.sketches) if trained.sketches is not None else None
    timers["gather"] += time.perf_counter() - t0
    rt.measured[trained_ids] = True
    if rt.rank == 0:
        rt.store.record(trained_ids, losses, sketches, step)
