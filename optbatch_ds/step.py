"""DESIGN §2 steps 2-6 for one pool of candidates: the OptBatch step that every entry point shares.

launch/train.py (`trainer.Recipe.train_step`), the Hugging Face Trainer integration (`hf_trainer`) and
offline pruning (`offline`) call these functions on every rank, around one `SelectionRuntime` built
once per run:

    rt = SelectionRuntime.build(engine.module, optbatch, sizes, pad_id, curvature, total_steps, rank)
    choice = choose_batch(rt, engine, my_items, step, timers)          # 2-5: score, gather, select, broadcast
    loss_sum, tokens = train_on(rt, engine, dataset, my_ids, my_weights, step)   # 6: forward, backward, step

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

import torch

from optbatch_ds import batching, comm
from optbatch_ds.config import BatchSizes, OptBatchConfig
from optbatch_ds.scoring.forward import Scorer
from optbatch_ds.selection import Selector, mean_nn_distance

# The parts of a step, timed apart (seconds), in the order they run; metrics.jsonl's "time" has each.
TIME_PARTS = ("draw", "curvature", "score_forward", "features", "gather", "select", "broadcast", "train",
              "diagnostics")
# The selector's info keys that go into metrics.jsonl (the rest stays in selection.jsonl or is dropped).
LOGGED_INFO = ("mean_loss_candidates", "mean_loss_selected", "quotas", "stratum_sizes", "diversity_kept",
               "diversity_random", "excluded_nonfinite", "drop_rate", "suspects", "outlier_fence",
               "inverse_temperature")
# Seed stride of the diagnostic random subset (a prime, like the selector's own stride, so (seed, step)
# pairs do not collide); the subset only measures diversity and never changes what is trained.
_DIAGNOSTIC_STRIDE = 7919


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite: stopping beats training on garbage."""


def new_timers() -> dict[str, float]:
    """A fresh {part: 0.0} for every part of TIME_PARTS."""
    return dict.fromkeys(TIME_PARTS, 0.0)


@dataclass
class SelectionRuntime:
    """What the OptBatch step needs that does not change between steps (built once per run, every rank).

    curvature: a collective callable returning 1 / sqrt(v_hat + eps), (V, d), or None (no Adam state yet);
    called only when the features need it.
    """

    optbatch: OptBatchConfig
    selector: Selector
    scorer: Scorer
    sizes: BatchSizes
    rank: int
    curvature: Callable[[], torch.Tensor | None]

    @classmethod
    def build(cls, module, optbatch: OptBatchConfig, sizes: BatchSizes, pad_id: int,
              curvature: Callable[[], torch.Tensor | None], total_steps: int | None, rank: int) -> "SelectionRuntime":
        """module: the model being trained (its lm_head sizes the sketch projection); total_steps: the planned
        optimizer steps (training progress for a temperature schedule; None if unknown)."""
        scorer = Scorer.build(module, optbatch, pad_id, sizes.micro_batch_size)
        return cls(optbatch, Selector(optbatch.selection_config(), total_steps=total_steps), scorer, sizes, rank,
                   curvature)

    @property
    def pad_id(self) -> int:
        return self.scorer.pad_id


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


def score_and_gather(rt: SelectionRuntime, engine, items: list, timers: dict) -> Scores:
    """Steps 2-3: score this rank's candidates `items` with the model, gather (loss, sketch) to rank 0.
    Collective: every rank calls it with the same number of items."""
    t0 = time.perf_counter()
    inv_sqrt_v = rt.curvature() if rt.scorer.wants_curvature else None
    timers["curvature"] = time.perf_counter() - t0
    losses, sketches, tokens = rt.scorer.score(engine, items, inv_sqrt_v, timers)
    t0 = time.perf_counter()
    all_losses = comm.gather_to_rank0(losses)
    all_sketches = comm.gather_to_rank0(sketches) if sketches is not None else None
    timers["gather"] = time.perf_counter() - t0
    return Scores(all_losses, all_sketches, tokens, inv_sqrt_v is not None)


def choose_batch(rt: SelectionRuntime, engine, items: list, step: int, timers: dict) -> Choice:
    """Steps 2-5 for one pool: score this rank's candidates `items` (skipped by methods that never look at
    the samples), gather to rank 0, select b of the c there, broadcast, check every rank holds the same.
    Collective. Raises comm.DisagreementError on every rank if the ranks end up holding different batches."""
    ob, c, b = rt.optbatch, rt.sizes.candidates, rt.sizes.train_batch_size
    scores = score_and_gather(rt, engine, items, timers) if ob.needs_scores else Scores(None, None, 0, False)
    t0 = time.perf_counter()
    positions = weights = strata = None
    info: dict = {}
    if rt.rank == 0:
        result = rt.selector(step, scores.losses if ob.needs_scores else torch.zeros(c), scores.sketches, b)
        positions = torch.as_tensor(result.indices, dtype=torch.long)
        weights = torch.as_tensor(result.weights, dtype=torch.float32)
        strata = torch.as_tensor(result.strata) if result.strata is not None else None
        info = dict(result.info)
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


def train_on(rt: SelectionRuntime, engine, dataset, ids: list, weights: torch.Tensor, step: int,
             last_ckpt: str | None = None) -> tuple[float, int]:
    """Step 6: forward, backward and optimizer step on this rank's share `ids` (indices into `dataset`, with
    their loss weights), micro-batch by micro-batch as the DeepSpeed config says. Returns (sum of the
    per-sample losses, trained tokens). Raises NonFiniteLossError on every rank together."""
    micro = rt.sizes.micro_batch_size
    loss_sum, train_tokens = 0.0, 0
    for m in range(rt.sizes.grad_accum):
        mids = ids[m * micro:(m + 1) * micro]
        batch = batching.collate([dataset[i] for i in mids], rt.pad_id, engine.device)
        train_tokens += int(batch["attention_mask"].sum())
        outp = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        per = batching.per_sample_nll(outp.logits, batch["labels"])
        loss = (per * weights[m * micro:(m + 1) * micro].to(per.device)).mean()
        if comm.any_rank(not bool(torch.isfinite(loss))):
            bad = comm.all_gather_objects([i for i, v in zip(mids, per.tolist()) if not math.isfinite(v)])
            raise NonFiniteLossError(
                f"non-finite training loss at step {step} (samples {sorted(sum(bad, []))}); "
                f"last good checkpoint: {last_ckpt or 'none'}")
        engine.backward(loss)
        engine.step()
        loss_sum += float(per.detach().sum())
    return loss_sum, train_tokens
