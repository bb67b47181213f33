"""What the strata and quotas of step 4 rank candidates by (the "optbatch" key `signal`), and the per-sample
record it needs (`SampleStore`): DESIGN §2b, "select what is learnable".

    loss       the candidate's loss (the paper's signal)
    reducible  loss minus a reference loss (RHO-LOSS; JEST's learnability): what the learner has not learned
               yet but a reference model trained on clean data finds learnable. Reference losses come from
               launch/reference.py (`reference_losses`); records without one get the mean reference loss.
    neighbours minus the excess of the candidate's loss over the median loss of its nearest recorded samples
               in the sketch space of DESIGN §2 (the curvature-normalised output-layer gradient sketches):
               reference-free, chosen on evidence (BENCHMARKS.md). A wrong answer is much harder than the
               samples whose gradients look like its own, while a hard task's samples are all hard together,
               so the signal flags defects without turning away from hard tasks. Uses the SampleStore's
               recorded losses and sketches (no extra forward); 0 where a candidate has no sketch yet.
    progress   1 - loss / first loss: how much of its loss at first sight the learner has already shed
               (reference-free; in BENCHMARKS.md as an ablation). 0 on first sight.
    truncation minus the candidate's loss standardised within its task: (loss - median) / (IQR / 1.349) over the
               losses of the same task (`Example.task`; one group when the data has no task labels) recorded in
               the same window of steps (~WINDOW_SAMPLES samples), so that a loss is judged against losses of the
               same age; 0 for a candidate never measured. Loss truncation (Kang & Hashimoto, "Improved Natural
               Language Generation via Loss Truncation", ACL 2020) made per task and per age: with top-k it drops
               the share of each task the learner finds least likely, which in fine-tuning a pretrained base are
               mostly the wrong answers; from scratch it keeps hard records unlearned (BENCHMARKS.md §7), so it
               is the `finetune` preset's signal only. Reference-free; no sketches.

Every signal is a float per candidate, higher = more worth training; selection is unchanged apart from
ranking by it (strata are its quantiles, the exp(signal / tau) draw sets the quotas, online_hard takes its
top, infobatch drops below its mean). `select` still reports the candidates' mean *loss*.

`SampleStore` keeps, per dataset index, the last measured loss and sketch (and when, and the first loss):
filled by fresh scoring forwards and, with "scoring": "stale", by the training forwards themselves, so the
selector can use recorded values instead of a second forward (DESIGN §2b "free scoring"). It lives on
rank 0, in CPU memory: N x (2 k + 12) bytes for N records and sketch dimension k (float16 sketches;
3000 records at k = 512: 3.1 MB; a million: 1.0 GB), and it is saved in every checkpoint.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from optbatch_ds.data.hashing import example_hash
from optbatch_ds.errors import ConfigError
from optbatch_ds.options import bad, check_choices, option

SIGNALS = ("loss", "reducible", "neighbours", "progress", "truncation")
STORE_SIGNALS = ("progress", "neighbours", "truncation")  # signals that read the SampleStore, whatever the scoring
MIN_GROUP = 8               # truncation: recorded losses a task's window needs before its own median and spread count
WINDOW_SAMPLES = 320        # truncation: recorded samples per window of steps (20 steps of a 16-sample batch)
NEIGHBOURS = 10              # k of the neighbours signal
NEIGHBOUR_POOL = 8192        # recorded samples the neighbours are searched among (a seeded subset beyond this)
LOSSES_FILE, COST_FILE = "reference_losses.jsonl", "cost.json"  # what launch/reference.py writes


@dataclass(frozen=True)
class SignalConfig:
    """The signal keys of the "optbatch" section."""

    signal: str = option("neighbours", "What strata, quotas and the within-stratum choice rank candidates by: loss (the "
                         "paper's); reducible (loss minus the reference loss of launch/reference.py: learnable, not "
                         "wrong); neighbours (reference-free: minus the excess of the loss over that of the nearest "
                         "samples in sketch space); progress (1 - loss / first loss); truncation (minus the loss "
                         "standardised within its task: drops what the learner finds least likely).", choices=SIGNALS)
    reference_losses: str | None = option(None, "Output folder of launch/reference.py (or its reference_losses.jsonl); "
                                          "needed by signal reducible. Its cost is added to the run's FLOPs.")

    def __post_init__(self):
        check_choices(self, SignalConfig)
        if self.signal == "reducible" and not self.reference_losses:
            raise bad("reference_losses", "signal 'reducible' needs reference losses: run launch/reference.py and "
                      "give its output folder here (or --reference-losses DIR)")


class SampleStore:
    """Per dataset index: the last measured loss and sketch, the step and source of that measurement, and the
    first loss ever measured. Rank 0 only; plain numpy arrays, so state_dict is small and exact."""

    def __init__(self, num_samples: int, sketch_dim: int):
        self.loss = np.full(num_samples, np.nan, dtype=np.float32)
        self.first_loss = np.full(num_samples, np.nan, dtype=np.float32)
        self.step = np.full(num_samples, -1, dtype=np.int32)
        self.sketch = np.zeros((num_samples, sketch_dim), dtype=np.float16) if sketch_dim else None

    @property
    def nbytes(self) -> int:
        parts = (self.loss, self.first_loss, self.step) + ((self.sketch,) if self.sketch is not None else ())
        return int(sum(a.nbytes for a in parts))

    def record(self, ids, losses: torch.Tensor, sketches: torch.Tensor | None, step: int) -> None:
        """Store measurements of samples `ids` (dataset indices) taken at `step`; non-finite ones are ignored."""
        ids = np.asarray(ids, dtype=np.int64)
        loss = losses.detach().cpu().numpy().astype(np.float32)
        ok = np.isfinite(loss)
        if sketches is not None and self.sketch is not None:
            sk = sketches.detach().cpu().float().numpy()
            ok &= np.isfinite(sk).all(axis=1)
            self.sketch[ids[ok]] = sk[ok].astype(np.float16)
        ids, loss = ids[ok], loss[ok]
        self.loss[ids] = loss
        first = np.isnan(self.first_loss[ids])
        self.first_loss[ids[first]] = loss[first]
        self.step[ids] = step

    def values(self, ids) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(losses (c,) float32 with NaN where never measured, sketches (c, k) float32 or None) of `ids`."""
        ids = np.asarray(ids, dtype=np.int64)
        sketches = torch.from_numpy(self.sketch[ids].astype(np.float32)) if self.sketch is not None else None
        return torch.from_numpy(self.loss[ids].copy()), sketches

    def state_dict(self) -> dict:
        return {"loss": self.loss, "first_loss": self.first_loss, "step": self.step, "sketch": self.sketch}

    def load_state_dict(self, state: dict) -> None:
        if state["loss"].shape != self.loss.shape:
            raise ValueError(f"the store was saved for {state['loss'].shape[0]} samples, the dataset has "
                             f"{self.loss.shape[0]}")
        self.loss, self.first_loss, self.step = state["loss"], state["first_loss"], state["step"]
        if self.sketch is not None and state.get("sketch") is not None:
            self.sketch = state["sketch"]


def reducible(losses: torch.Tensor, reference: np.ndarray) -> torch.Tensor:
    """loss - reference loss per candidate (float64); NaN losses stay NaN (excluded by select)."""
    return losses.to(torch.float64) - torch.from_numpy(np.asarray(reference, dtype=np.float64))


def neighbour_excess(losses: torch.Tensor, sketches: torch.Tensor, pool_losses: np.ndarray,
                     pool_sketches: np.ndarray, k: int = NEIGHBOURS) -> torch.Tensor:
    """loss - median loss of the k nearest pool samples in sketch space (euclidean), per candidate: float64 (c,).

    losses (c,), sketches (c, d); pool_losses (m,), pool_sketches (m, d) float, the recorded samples to compare
    with (the caller leaves the candidates themselves out). NaN for a candidate whose sketch is not finite."""
    x = sketches.detach().cpu().double().numpy()
    pool = np.asarray(pool_sketches, dtype=np.float64)
    d = (x * x).sum(1)[:, None] - 2.0 * x @ pool.T + (pool * pool).sum(1)[None, :]
    k = min(k, pool.shape[0])
    nearest = np.argpartition(d, k - 1, axis=1)[:, :k]
    excess = losses.detach().cpu().double().numpy() - np.median(np.asarray(pool_losses, np.float64)[nearest], axis=1)
    excess[~np.isfinite(x).all(1)] = np.nan
    return torch.from_numpy(excess)


def progress(losses: torch.Tensor, first: np.ndarray) -> torch.Tensor:
    """1 - loss / first loss per candidate (float64): 0 on first sight, towards 1 as the loss vanishes."""
    return 1.0 - losses.to(torch.float64) / torch.from_numpy(np.asarray(first, dtype=np.float64))


def robust_standardise(losses: np.ndarray, keys: np.ndarray, pool_losses: np.ndarray, pool_keys: np.ndarray,
                       min_count: int = MIN_GROUP) -> np.ndarray:
    """(loss - median) / (IQR / 1.349) of each candidate, the median and IQR taken over the finite pool losses with
    the candidate's key: float64 (c,). NaN where that key has fewer than `min_count` finite pool losses, and
    where the loss is NaN. IQR / 1.349 is the normal-consistent spread; a zero spread counts as 1.

    losses (c,), keys (c,) int; pool_losses (m,), pool_keys (m,) int."""
    losses, pool_losses = np.asarray(losses, np.float64), np.asarray(pool_losses, np.float64)
    keys, pool_keys = np.asarray(keys), np.asarray(pool_keys)
    out = np.full(losses.shape, np.nan)
    finite = np.isfinite(pool_losses)
    for key in np.unique(keys):
        ref = pool_losses[finite & (pool_keys == key)]
        if ref.size < max(min_count, 1):
            continue
        q1, med, q3 = np.percentile(ref, [25, 50, 75])
        spread = (q3 - q1) / 1.349
        mine = keys == key
        out[mine] = (losses[mine] - med) / (spread if spread > 0 else 1.0)
    return out


@dataclass
class SignalContext:
    """What the signals read besides the candidates' own losses: the reference loss per dataset index (NaN
    filled), the SampleStore (first losses; recorded losses and sketches for neighbours), the task group of
    every dataset index (int (N,), or None: one group), and the seed and step that fix the neighbours' search
    subset."""

    reference: np.ndarray | None = None
    store: "SampleStore | None" = None
    seed: int = 0
    step: int = 0
    groups: np.ndarray | None = None
    batch: int = 0           # samples recorded per step (the train batch): sets the truncation signal's window


def _truncation(losses: torch.Tensor, ids: np.ndarray, ctx: SignalContext) -> torch.Tensor:
    """The truncation signal (module docstring): minus the candidate's loss standardised among the losses of its
    task recorded in the same window of steps (its contemporaries: losses fall as training goes on, so a loss
    recorded early is compared with others recorded early), else among all of its task's, else among all
    recorded; 0 (its task's median) for a candidate never measured, whose loss is only a prior."""
    out = np.zeros(len(ids))
    store = ctx.store
    if store is None:
        return torch.from_numpy(out)
    groups = ctx.groups if ctx.groups is not None else np.zeros(store.loss.shape[0], dtype=np.int64)
    window = max(1, math.ceil(WINDOW_SAMPLES / ctx.batch)) if ctx.batch else 1
    buckets = np.maximum(store.step, 0) // window
    measured = store.step[ids] >= 0
    if not measured.any():
        return torch.from_numpy(out)
    loss = losses.detach().cpu().numpy().astype(np.float64)[measured]
    mine = ids[measured]
    n_groups = int(groups.max()) + 1
    z = robust_standardise(loss, buckets[mine] * n_groups + groups[mine], store.loss, buckets * n_groups + groups)
    for keys, pool_keys in ((groups[mine], groups), (np.zeros(len(mine)), np.zeros(len(groups)))):
        todo = np.isnan(z)
        if not todo.any():
            break
        z[todo] = robust_standardise(loss[todo], keys[todo], store.loss, pool_keys, min_count=2)
    out[measured] = -np.nan_to_num(z, nan=0.0)
    out[~torch.isfinite(losses).cpu().numpy()] = np.nan  # excluded by select, like every signal's
    return torch.from_numpy(out)


def _neighbours(losses: torch.Tensor, sketches: torch.Tensor | None, ids: np.ndarray, ctx: SignalContext):
    """The neighbours signal (module docstring): 0 until the store holds enough recorded samples."""
    store = ctx.store
    out = torch.zeros(len(ids), dtype=torch.float64)
    if sketches is None or store is None or store.sketch is None:
        return out
    recorded = np.flatnonzero(~np.isnan(store.loss))
    recorded = recorded[~np.isin(recorded, ids)]
    if recorded.size < NEIGHBOURS:
        return out
    if recorded.size > NEIGHBOUR_POOL:
        rng = np.random.default_rng([ctx.seed, ctx.step, 7])
        recorded = np.sort(rng.choice(recorded, NEIGHBOUR_POOL, replace=False))
    has = torch.as_tensor(store.step[ids] >= 0) & torch.isfinite(losses)
    if bool(has.any()):
        excess = neighbour_excess(losses[has], sketches[has], store.loss[recorded],
                                  store.sketch[recorded].astype(np.float32))
        out[has] = -excess
    return out


def signal_values(name: str, losses: torch.Tensor, sketches: torch.Tensor | None, ids,
                  ctx: SignalContext) -> torch.Tensor | None:
    """The selection signal (higher = more worth training) of candidates `ids` (dataset indices) with `losses`
    (c,) and `sketches` (c, k) or None; None for "loss" (select ranks by the losses themselves)."""
    ids = np.asarray(ids, dtype=np.int64)
    if name == "loss":
        return None
    if name == "reducible":
        return reducible(losses, ctx.reference[ids])
    if name == "neighbours":
        return _neighbours(losses, sketches, ids, ctx)
    if name == "progress":
        first = ctx.store.first_loss[ids].astype(np.float64) if ctx.store is not None else np.full(len(ids), np.nan)
        # 0 on first sight by definition (the loss may be a prior, even 0: never 1 - 0 / 0)
        return progress(losses, first).masked_fill(torch.from_numpy(np.isnan(first)), 0.0)
    if name == "truncation":
        return _truncation(losses, ids, ctx)
    raise ValueError(f"unknown signal {name!r}")


def prior_losses(recorded: np.ndarray, ids: np.ndarray, groups: np.ndarray | None,
                 reference: np.ndarray | None) -> np.ndarray:
    """The loss a candidate never measured is given under `prior: mean` (no forward), float64 (len(ids),): the
    mean loss recorded so far among the records of its task; the mean over all tasks where its task has none;
    before anything is recorded, the mean reference loss of its task's candidates (so `reducible` starts at
    the candidate's reference loss against its task's, every task centred), else 0.

    recorded: float (N,), a loss per dataset index, NaN where none; ids: int (C,) dataset indices; groups: int
    (N,) task group per dataset index, or None (one group); reference: float (N,), NaN filled, or None.
    Per task because tasks' losses differ by far more than records' within a task: one mean for all would rank
    the never-measured records of a task by how hard the task is."""
    ids = np.asarray(ids, dtype=np.int64)
    groups = groups if groups is not None else np.zeros(recorded.shape[0], dtype=np.int64)
    have = ~np.isnan(recorded)
    if not have.any():
        if reference is None:
            return np.zeros(len(ids))
        g, ref = groups[ids], reference[ids]
        sums, counts = np.bincount(g, weights=ref), np.bincount(g)
        return sums[g] / counts[g]
    sums = np.bincount(groups[have], weights=recorded[have], minlength=int(groups.max()) + 1)
    counts = np.bincount(groups[have], minlength=int(groups.max()) + 1)
    means = np.where(counts > 0, sums / np.maximum(counts, 1), recorded[have].mean())
    return means[groups[ids]]


def task_groups(tasks) -> np.ndarray:
    """int64 (N,): one group id per record, the same for records of the same task (ids in sorted task order)."""
    return np.unique(np.asarray(list(tasks), dtype=object), return_inverse=True)[1].astype(np.int64)


def fill_reference(values: np.ndarray) -> tuple[np.ndarray, int, float]:
    """(reference losses with every NaN replaced by the mean of the others, how many were NaN, that mean)."""
    missing = np.isnan(values)
    mean = float(values[~missing].mean()) if (~missing).any() else math.nan
    return np.where(missing, mean, values), int(missing.sum()), mean


def reference_files(path: str) -> tuple[str, str]:
    """(folder, losses file) of a `reference_losses` value: launch/reference.py's output folder or its
    reference_losses.jsonl. Raises ConfigError naming what is missing (checked before any data or model loads)."""
    if not os.path.exists(path):
        raise ConfigError(f"reference_losses {path}: no such folder or file (make one with launch/reference.py "
                          f"--output {path})")
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    file = os.path.join(path, LOSSES_FILE) if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise ConfigError(f"reference_losses {path}: no {LOSSES_FILE} in it (make one with launch/reference.py)")
    return folder, file


@dataclass
class ReferenceLosses:
    """What launch/reference.py wrote: per-record reference losses (by record hash) and their cost."""

    by_hash: dict[str, float]
    cost: dict
    path: str

    @classmethod
    def load(cls, path: str) -> "ReferenceLosses":
        """From the output directory of launch/reference.py (or its reference_losses.jsonl). Raises ConfigError."""
        folder, file = reference_files(path)
        by_hash = {}
        with open(file, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        rec = json.loads(line)
                        by_hash[rec["hash"]] = float(rec["loss"]) if rec["loss"] is not None else math.nan
                    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                        raise ConfigError(f"{file}:{lineno}: not a reference loss line ({exc})") from None
        cost_path = os.path.join(folder, COST_FILE)
        cost = json.load(open(cost_path)) if os.path.exists(cost_path) else {}
        return cls(by_hash, cost, os.path.abspath(file))

    def for_examples(self, examples: list) -> tuple[np.ndarray, int]:
        """(reference loss of every example, float64 (N,), NaN where none; how many have none)."""
        values = np.array([self.by_hash.get(example_hash(e), math.nan) for e in examples], dtype=np.float64)
        return values, int(np.isnan(values).sum())

    def for_run(self, examples: list) -> tuple[np.ndarray, dict]:
        """(reference loss per example with the unmatched ones filled by the mean of the matched, float64 (N,);
        a summary for config.json and the log: path, matched, unmatched, the fill value and the cost)."""
        values, _ = self.for_examples(examples)
        filled, unmatched, mean = fill_reference(values)
        return filled, {"path": self.path, "matched": len(examples) - unmatched, "unmatched": unmatched,
                        "fill": mean, "flops": self.flops, "wall_s": self.wall_s}

    @property
    def flops(self) -> float:
        return float(self.cost.get("total_flops", 0.0))

    @property
    def wall_s(self) -> float:
        return float(self.cost.get("total_wall_s", 0.0))


def reference_losses(optbatch, examples: list) -> tuple[np.ndarray | None, dict | None]:
    """(reference loss per training example, NaN-free, or None; a summary for config.json, or None) of the
    "optbatch" section's `reference_losses` (none given: (None, None)). Logs how many records matched."""
    if not optbatch.reference_losses:
        return None, None
    from optbatch_ds.comm import log0

    values, summary = ReferenceLosses.load(optbatch.reference_losses).for_run(examples)
    log0(f"reference losses: {summary['matched']} of {len(examples)} records matched by content "
         f"({summary['unmatched']} unmatched get the mean, {summary['fill']:.4f}) | cost {summary['flops']:.3g} FLOPs, "
         f"{summary['wall_s']:.1f} s (counted in the run's totals)")
    return values, summary
