"""What a finished run's selection did over training, read from its selection.jsonl (launch/analyze_run.py).

For training data whose records carry labels (the demo set: "task" and "defect"), per epoch:
  - the median candidate loss of each (task, defect) group: which samples are hard, and when;
  - the share of trained samples that are defective (misaligned or truncated answers);
  - how well the candidate loss alone tells defective from clean samples (ROC AUC; 0.5 = not at all);
  - for every candidate selection signal (`SIGNALS`, computed from the loss trajectories and, with
    --reference-losses, launch/reference.py's losses): P(signal of a defective > signal of a clean sample)
    (a good signal is low: it does not favour wrong answers) and P(signal of a hard clean > signal of an easy
    clean sample) (a good signal is high: it still favours what is left to learn). "Hard" clean samples are
    those whose first-epoch loss is above the median of the clean ones.
Every sample is a candidate once per epoch, so the logged candidate losses are a loss trajectory for every
training sample. Needs the "losses" field the trainer writes to selection.jsonl for scored methods.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

import numpy as np

from optbatch_ds.bench.io import WRONG_ANSWERS as DEFECTIVE  # duplicates are right answers seen twice
from optbatch_ds.bench.io import read_json, read_jsonl, record_labels
from optbatch_ds.errors import ConfigError

# Candidate selection signals, from the loss matrix L (epochs x samples, NaN where not a candidate), the epoch e,
# the first loss of each sample and its reference loss (None without --reference-losses). Higher = selected.
SIGNALS = {
    "loss": lambda L, e, first, ref: L[e],
    "reducible": lambda L, e, first, ref: None if ref is None else L[e] - ref,
    "first_loss": lambda L, e, first, ref: first,
    "loss_ratio": lambda L, e, first, ref: L[e] / first,
    "loss_drop": lambda L, e, first, ref: first - L[e],
    "last_drop": lambda L, e, first, ref: L[e - 1] - L[e] if e else None,
    "loss_vs_first": lambda L, e, first, ref: L[e] - first,
    "progress": lambda L, e, first, ref: 1.0 - L[e] / first,
    "neg_reference": lambda L, e, first, ref: None if ref is None else -ref + 0 * L[e],
}


def load_run(run_dir: str) -> tuple[list[dict], list[dict]]:
    """(selection lines, per training record its {"task", "defect"} labels) of a finished run."""
    sel_path, cfg_path = os.path.join(run_dir, "selection.jsonl"), os.path.join(run_dir, "config.json")
    for path in (sel_path, cfg_path):
        if not os.path.exists(path):
            raise ConfigError(f"{run_dir}: no {os.path.basename(path)} (not a launch/train.py output directory?)")
    train_data = (read_json(cfg_path) or {}).get("train_data")
    labels = record_labels(train_data)  # the same labels the benchmark report reads
    if labels is None:
        raise ConfigError(f"{train_data}: records carry no 'task' / 'defect' labels (the demo set does)")
    return read_jsonl(sel_path), [{"task": t, "defect": d} for d, t in zip(*labels)]


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counted half (Mann-Whitney U)."""
    pos, neg = scores[positive], scores[~positive]
    if not len(pos) or not len(neg):
        return float("nan")
    allv = np.concatenate([pos, neg])
    order = np.argsort(allv, kind="stable")
    ranks = np.empty(len(allv))
    ranks[order] = np.arange(1, len(allv) + 1)
    for v in np.unique(allv):  # average ranks of ties
        tie = allv == v
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def analyse(selection: list[dict], records: list[dict]) -> dict:
    if not selection:
        raise ConfigError("selection.jsonl is empty")
    per_epoch = len(records) // len(selection[0]["candidates"])
    epochs = (len(selection) + per_epoch - 1) // per_epoch
    defective = np.array([r["defect"] in DEFECTIVE for r in records])
    group_of = [f"{r['task']}/{r['defect'] if r['defect'] in DEFECTIVE else 'clean'}" for r in records]
    groups = sorted(set(group_of))
    out = {"epochs": epochs, "steps_per_epoch": per_epoch, "groups": groups,
           "median_loss": {g: [] for g in groups}, "defective_trained": [], "loss_auc": []}
    has_losses = any(line.get("losses") for line in selection)
    for e in range(epochs):
        lines = selection[e * per_epoch:(e + 1) * per_epoch]
        trained = [i for line in lines for i in line["selected"]]
        out["defective_trained"].append(float(defective[trained].mean()) if trained else float("nan"))
        if not has_losses:
            continue
        loss = np.full(len(records), np.nan)
        for line in lines:
            for i, value in zip(line["candidates"], line.get("losses") or []):
                if value is not None:
                    loss[i] = value
        seen = ~np.isnan(loss)
        out["loss_auc"].append(roc_auc(loss[seen], defective[seen]))
        by_group: dict[str, list[float]] = {g: [] for g in groups}
        for i in np.flatnonzero(seen):
            by_group[group_of[i]].append(float(loss[i]))
        for g, vals in by_group.items():
            out["median_loss"][g].append(statistics.median(vals) if vals else float("nan"))
    out["has_losses"] = has_losses
    return out


def loss_matrix(selection: list[dict], n: int, per_epoch: int) -> np.ndarray:
    """(epochs, n) candidate losses: row e holds every sample's loss when it was a candidate in epoch e (NaN if
    it was not: the few left over at an epoch's end)."""
    epochs = (len(selection) + per_epoch - 1) // per_epoch
    L = np.full((epochs, n), np.nan)
    for step, line in enumerate(selection):
        for i, value in zip(line["candidates"], line.get("losses") or []):
            if value is not None:
                L[step // per_epoch, i] = value
    return L


def _within_task(tasks: np.ndarray):
    """The truncation signal per epoch (signals.py): minus each loss standardised among the same task's losses of
    that epoch (an epoch's candidate losses are measured over one pass, so they are roughly of one age)."""
    from optbatch_ds.signals import robust_standardise, task_groups

    groups = task_groups(tasks)
    return lambda L, e, first, ref: -robust_standardise(L[e], groups, L[e], groups, min_count=2)


def signal_aucs(L: np.ndarray, defective: np.ndarray, reference: np.ndarray | None,
                tasks: np.ndarray | None = None) -> dict:
    """Per signal and epoch: AUC(defective > clean) and AUC(hard clean > easy clean) (module docstring); with
    `tasks` (the task of every record) also the truncation signal, the loss standardised within each task."""
    first = np.full(L.shape[1], np.nan)
    for row in L:  # the first loss each sample ever had
        first = np.where(np.isnan(first), row, first)
    clean = ~defective
    hard = clean & (first > np.nanmedian(first[clean]))
    out = {}
    signals = dict(SIGNALS)
    if tasks is not None:
        signals["truncation"] = _within_task(tasks)
    for name, fn in signals.items():
        per = {"defective": [], "hard_clean": []}
        for e in range(L.shape[0]):
            s = fn(L, e, first, reference)
            ok = None if s is None else ~np.isnan(s)
            per["defective"].append(float("nan") if s is None else roc_auc(s[ok], defective[ok]))
            per["hard_clean"].append(float("nan") if s is None else roc_auc(s[ok & clean], hard[ok & clean]))
        if not all(np.isnan(per["defective"])):
            out[name] = per
    return out


def markdown(result: dict, run_dir: str) -> str:
    e = result["epochs"]
    head = "| | " + " | ".join(str(i) for i in range(e)) + " |"
    rule = "|---|" + "---|" * e
    lines = [f"# Selection over training: {run_dir}", "",
             f"{e} epochs of {result['steps_per_epoch']} steps; columns are epochs.", "",
             "Share of the trained samples that are defective (misaligned or truncated answers):", "", head, rule,
             "| defective trained | " + " | ".join(f"{100 * x:.1f}%" for x in result["defective_trained"]) + " |"]
    if result["has_losses"]:
        lines += ["", "How well the candidate loss alone separates defective from clean samples (ROC AUC; 0.5 = "
                  "not at all, 1 = every defective sample has a higher loss than every clean one):", "", head, rule,
                  "| loss AUC | " + " | ".join(f"{x:.3f}" for x in result["loss_auc"]) + " |",
                  "", "Median candidate loss per task / defect:", "", head, rule]
        lines += [f"| {g} | " + " | ".join(f"{x:.3f}" for x in result["median_loss"][g]) + " |" for g in result["groups"]]
    else:
        lines += ["", "(no candidate losses in selection.jsonl: this method does not score its candidates)"]
    if result.get("signals"):
        lines += ["", "Candidate signals (higher = selected). AUC defective: P(signal of a defective > of a clean "
                  "sample), good when low; AUC hard: P(signal of a hard clean > of an easy clean sample), good when "
                  "high:", "", "| signal | AUC | " + " | ".join(str(i) for i in range(e)) + " |",
                  "|---|---|" + "---|" * e]
        for name, per in result["signals"].items():
            for key, label in (("defective", "defective"), ("hard_clean", "hard")):
                lines.append(f"| {name} | {label} | " + " | ".join(f"{x:.3f}" for x in per[key]) + " |")
    return "\n".join(lines) + "\n"


def _reference_for(run_dir: str, path: str | None) -> np.ndarray | None:
    """The reference loss of every training record of the run (NaN where none), or None without a path."""
    if path is None:
        return None
    from optbatch_ds.data import load_examples
    from optbatch_ds.signals import ReferenceLosses

    train_data = (read_json(os.path.join(run_dir, "config.json")) or {}).get("train_data")
    return ReferenceLosses.load(path).for_examples(load_examples(train_data))[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="launch/analyze_run.py", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="A launch/train.py --output-dir (e.g. bench_out/e10/runs/optbatch_a0.30_s0).")
    p.add_argument("--json", default=None, help="Also write the numbers to this file.")
    p.add_argument("--reference-losses", default=None,
                   help="launch/reference.py's output folder: adds the reducible signal to the signal table.")
    args = p.parse_args(argv)
    selection, records = load_run(args.run_dir)
    result = analyse(selection, records)
    if result["has_losses"]:
        L = loss_matrix(selection, len(records), result["steps_per_epoch"])
        result["signals"] = signal_aucs(L, np.array([r["defect"] in DEFECTIVE for r in records]),
                                        _reference_for(args.run_dir, args.reference_losses),
                                        np.array([r["task"] for r in records]))
    print(markdown(result, args.run_dir), end="")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
