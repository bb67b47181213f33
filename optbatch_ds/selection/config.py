"""Selection settings, result type and error: the vocabulary shared by every selection method.

`SelectionConfig` is the one declaration of the selection keys of the "optbatch" section (the
DeepSpeed JSON's, `optbatch_ds.config.OptBatchConfig` composes it): each key with its default, help
text and allowed values, validated once in `__post_init__`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from optbatch_ds.errors import UserError
from optbatch_ds.options import as_float, as_int, bad, check_choices, option

METHODS = ("full", "random", "online_hard", "ccs", "infobatch", "optbatch")
QUOTAS = ("exp_loss", "uniform")
WITHIN = ("farthest", "random", "top")
DISTANCES = ("euclidean", "cosine")
REWEIGHTS = ("none", "strata", "upweight")
STRATA_BY = ("signal", "loss", "task")


class SelectionError(UserError):
    """The candidates cannot fill the budget (e.g. too many non-finite losses or sketches)."""


@dataclass(frozen=True)
class SelectionConfig:
    """How step 4 (DESIGN §2) chooses `budget` of the c candidates; see `select`."""

    method: str = option("optbatch", "Selection method: optbatch, or a baseline: random, online_hard (top loss), "
                         "ccs (loss strata, even budget), infobatch (drop low-loss, reweight the rest), full "
                         "(no pruning).", choices=METHODS)
    strata: int = option(3, "K loss-quantile strata (optbatch, ccs); 1 = none (with strata_by task, which needs 1: "
                         "one stratum per task).")
    temperature: float = option(1.0, "tau of the exp(loss / tau) quota draw (optbatch); \"inf\" = flat.")
    temperature_end: float | None = option(
        None, "tau at the last step: 1/tau moves linearly from 1/temperature to 1/temperature_end over training; "
              "negative favours low loss late in training (when the highest losses are mostly defects), \"inf\" "
              "ends flat; null = constant.")
    quotas: str = option("exp_loss", "optbatch stratum quotas: exp_loss (how many of an exp(loss / tau) draw fall "
                         "in each stratum) or uniform (ablation).", choices=QUOTAS)
    within: str = option("top", "optbatch choice inside a stratum: top (its highest-signal members; with strata 1, "
                         "plain top-k), farthest (the paper's farthest-point in sketch space) or random (ablation).",
                         choices=WITHIN)
    distance: str = option("euclidean", "Sketch distance of the farthest-point step: euclidean or cosine.",
                           choices=DISTANCES)
    strata_by: str = option("loss", "optbatch: what the strata and their quotas are cut on: loss (difficulty: every "
                            "loss level keeps its share, and within=top picks the best signal inside each) or signal "
                            "(the same ranking as the within-stratum choice: the paper's, where signal is the loss) or "
                            "task (the records' task field: each task keeps its share of the pool, the choice inside "
                            "each by within; needs strata 1, no quota draw).",
                            choices=STRATA_BY)
    reweight: str = option("none", "optbatch loss weights: none (the paper's); strata: each trained sample "
                           "weighted by its stratum's size / quota (mean 1), the stratified-sampling estimate of the "
                           "pool's loss; upweight: that weight only where it is above 1 (strata the quotas "
                           "under-sample), like InfoBatch's rescaling.", choices=REWEIGHTS)
    outlier_fence: float = option(0.0, "k of Tukey's fence Q3 + k IQR over each pool's losses (optbatch): candidates "
                                  "above it (suspected defects) only fill the budget when the rest cannot; 0 = off.")
    seed: int = option(0, "Seed of the selection draws (combined with the step) and of the sketch projection.")

    def __post_init__(self):
        check_choices(self, SelectionConfig)
        strata = as_int(self.strata, "strata")
        if strata < 1:
            raise bad("strata", f"{self.strata!r} must be an integer >= 1 (1 = no strata)")
        if self.strata_by == "task" and strata != 1:
            raise bad("strata_by", f"'task' makes the tasks the strata; set strata 1 (got {strata}), or cut on loss "
                      f"or signal")
        t = as_float(self.temperature, "temperature")
        if not t > 0:  # also NaN
            raise bad("temperature", f"{self.temperature!r} must be a number > 0 (or \"inf\")")
        te = self.temperature_end
        if te is not None:
            te = as_float(te, "temperature_end")
            if te != te or te == 0:
                raise bad("temperature_end", f"{self.temperature_end!r} must be a nonzero number, \"inf\" or null")
        fence = as_float(self.outlier_fence, "outlier_fence", allow_inf=False)
        if not (math.isfinite(fence) and fence >= 0):
            raise bad("outlier_fence", f"{self.outlier_fence!r} must be a number >= 0 (0 = off, 1.5 = Tukey's usual)")
        # Normalise numeric types so equality, hashing and JSON dumps are plain Python values.
        for key, value in (("strata", strata), ("temperature", t), ("temperature_end", te),
                           ("outlier_fence", fence), ("seed", as_int(self.seed, "seed"))):
            object.__setattr__(self, key, value)

    def inverse_temperature(self, progress: float) -> float:
        """1/tau of the quota draw at `progress` in [0, 1] (fraction of training done): 1/temperature
        throughout, or moving linearly to 1/temperature_end."""
        start = 1.0 / self.temperature
        if self.temperature_end is None:
            return start
        p = min(max(float(progress), 0.0), 1.0)
        return (1.0 - p) * start + p * (1.0 / self.temperature_end)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(SelectionConfig)}


@dataclass
class SelectionResult:
    """What a selection returns.

    indices: int64 positions into the candidate arrays (length == budget, distinct), in selection
        order (optbatch: greedy pick order, highest-loss stratum first; sort them if order matters).
    weights: float32 per-selected-sample loss weight, aligned with indices, mean 1 (1.0 except infobatch
        and optbatch with reweight="strata" / "upweight").
    info: JSON-serialisable diagnostics (quotas, stratum sizes, counts of excluded candidates, ...).
    strata: int64 (c,) the loss stratum each candidate was placed in (0 = lowest loss), -1 where none:
        a method without strata, a non-finite candidate, or one set aside above the outlier fence.
    """

    indices: np.ndarray
    weights: np.ndarray
    info: dict
    strata: np.ndarray | None = None
