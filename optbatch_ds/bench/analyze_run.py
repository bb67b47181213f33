"""What a finished run's selection did over training, read from its selection.jsonl (launch/analyze_run.py).

For training data whose records carry labels (the demo set: "task" and "defect"), per epoch:
  - the median candidate loss of each (task, defect) group: which samples are hard, and when;
  - the share of trained samples that are defective (misaligned or truncated answers);
  - how well the candidate loss alone tells defective from clean samples (ROC AUC; 0.5 = not at all).
Every sample is scored once per epoch, so the logged candidate losses are a loss trajectory for every
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
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="launch/analyze_run.py", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="A launch/train.py --output-dir (e.g. bench_out/e10/runs/optbatch_a0.30_s0).")
    p.add_argument("--json", default=None, help="Also write the numbers to this file.")
    args = p.parse_args(argv)
    result = analyse(*load_run(args.run_dir))
    print(markdown(result, args.run_dir), end="")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
