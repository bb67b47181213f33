"""Selection settings, result type and error: the vocabulary shared by every selection method."""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields

import numpy as np

METHODS = ("full", "random", "online_hard", "ccs", "infobatch", "optbatch")
QUOTAS = ("exp_loss", "uniform")
WITHIN = ("farthest", "random")
DISTANCES = ("euclidean", "cosine")
REWEIGHTS = ("none", "strata", "upweight")


class SelectionError(ValueError):
    """The candidates cannot fill the budget (e.g. too many non-finite losses or sketches)."""


def _choice_error(name: str, value, allowed: tuple) -> ValueError:
    close = difflib.get_close_matches(str(value), allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"SelectionConfig.{name}={value!r} is not valid{hint}; expected one of {list(allowed)}")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


@dataclass(frozen=True)
class SelectionConfig:
    method: str = field(default="optbatch", metadata={"help": f"selection method, one of {METHODS}"})
    strata: int = field(default=3, metadata={"help": "K loss-quantile strata (optbatch, ccs)"})
    temperature: float = field(
        default=1.0,
        metadata={"help": "tau of the exp(loss / tau) quota draw (optbatch); inf = unweighted draw"},
    )
    temperature_end: float | None = field(
        default=None,
        metadata={"help": "optbatch: tau at the end of training; 1/tau moves linearly from 1/temperature to "
                          "1/temperature_end over training (negative: the draw prefers LOW loss; inf: unweighted). "
                          "None = constant temperature"},
    )
    quotas: str = field(
        default="exp_loss",
        metadata={"help": "optbatch stratum quotas: 'exp_loss' (draw ~ exp(loss/tau)) or 'uniform' (unweighted draw)"},
    )
    within: str = field(
        default="farthest",
        metadata={"help": "optbatch choice inside a stratum: 'farthest' (farthest-point in sketch space) or 'random'"},
    )
    distance: str = field(
        default="euclidean", metadata={"help": "sketch distance for farthest-point: 'euclidean' or 'cosine'"}
    )
    reweight: str = field(
        default="none",
        metadata={"help": "optbatch: 'none'; 'strata' = weight a selected sample of stratum s by "
                          "(n_s / q_s) * (budget / c), the stratified-sampling estimator of the pool's mean loss; "
                          "'upweight' = the same weight where it is above 1 (strata the quotas under-sample), 1 "
                          "elsewhere: InfoBatch's rescaling of the thinned low-loss part, per stratum"},
    )
    outlier_fence: float = field(
        default=0.0,
        metadata={"help": "optbatch: candidates with loss above Q3 + outlier_fence * IQR of the pool (Tukey's "
                          "fence) are suspected defects and only fill the budget when the rest cannot; 0 = off"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the selection draws (combined with the step)"})

    def __post_init__(self):
        if self.method not in METHODS:
            raise _choice_error("method", self.method, METHODS)
        if self.quotas not in QUOTAS:
            raise _choice_error("quotas", self.quotas, QUOTAS)
        if self.within not in WITHIN:
            raise _choice_error("within", self.within, WITHIN)
        if self.distance not in DISTANCES:
            raise _choice_error("distance", self.distance, DISTANCES)
        if self.reweight not in REWEIGHTS:
            raise _choice_error("reweight", self.reweight, REWEIGHTS)
        if not _is_int(self.strata) or self.strata < 1:
            raise ValueError(f"SelectionConfig.strata={self.strata!r} is not valid; expected an integer >= 1")
        f = self.outlier_fence
        if isinstance(f, (bool, np.bool_)) or not isinstance(f, (int, float, np.integer, np.floating)) \
                or not math.isfinite(float(f)) or float(f) < 0:
            raise ValueError(f"SelectionConfig.outlier_fence={f!r} is not valid; expected a number >= 0 (0 = off)")
        object.__setattr__(self, "outlier_fence", float(f))
        if not _is_int(self.seed):
            raise ValueError(f"SelectionConfig.seed={self.seed!r} is not valid; expected an integer")
        t = self.temperature
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, float, np.integer, np.floating)):
            raise ValueError(f"SelectionConfig.temperature={t!r} is not valid; expected a number > 0 (or inf)")
        if math.isnan(float(t)) or float(t) <= 0:
            raise ValueError(f"SelectionConfig.temperature={t!r} is not valid; expected a number > 0 (or inf)")
        te = self.temperature_end
        if te is not None:
            if isinstance(te, (bool, np.bool_)) or not isinstance(te, (int, float, np.integer, np.floating)) \
                    or math.isnan(float(te)) or float(te) == 0:
                raise ValueError(f"SelectionConfig.temperature_end={te!r} is not valid; expected a nonzero number, "
                                 "inf, or None")
            object.__setattr__(self, "temperature_end", float(te))
        # Normalise numeric types so equality, hashing and JSON dumps are plain Python values.
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "strata", int(self.strata))
        object.__setattr__(self, "seed", int(self.seed))

    def inverse_temperature(self, progress: float) -> float:
        """1/tau of the quota draw at `progress` in [0, 1] (fraction of training done): 1/temperature
        throughout, or moving linearly to 1/temperature_end."""
        start = 1.0 / self.temperature
        if self.temperature_end is None:
            return start
        p = min(max(float(progress), 0.0), 1.0)
        return (1.0 - p) * start + p * (1.0 / self.temperature_end)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class SelectionResult:
    """What a selection returns.

    indices: int64 positions into the candidate arrays (length == budget, distinct), in selection
        order (optbatch: greedy pick order, highest-loss stratum first; sort them if order matters).
    weights: float32 per-selected-sample loss weight, aligned with indices, mean 1 (1.0 except infobatch
        and optbatch with reweight="strata").
    info: JSON-serialisable diagnostics (quotas, stratum sizes, counts of excluded candidates, ...).
    """

    indices: np.ndarray
    weights: np.ndarray
    info: dict
