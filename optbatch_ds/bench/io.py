"""Reading and writing a benchmark's files: JSON and JSONL that may be torn by a killed run, and small stats.

Public helpers the plan, grid, report and analysis modules share (a run directory is what
launch/train.py wrote: config.json, metrics.jsonl, selection.jsonl, eval.json, eval_history.jsonl).
"""
from __future__ import annotations

import json
import math
import os


def fmt_value(v) -> str:
    """A config value as written in a variant label: strings bare, everything else as JSON."""
    return json.dumps(v) if not isinstance(v, str) else v


def tail(path: str, n: int) -> list[str]:
    """The last n lines of a text file ([] when it cannot be read)."""
    try:
        with open(path, errors="replace") as f:
            return [l.rstrip("\n") for l in f.readlines()[-n:]]
    except OSError:
        return []


def read_json(path: str):
    """The JSON document at path, or None when missing or broken."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def read_jsonl(path: str) -> list[dict]:
    """Every parseable line of a JSONL file ([] when missing); a torn last line of a killed run is skipped."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
    except OSError:
        pass
    return out


def clean(x):
    """NaN and infinities -> None, recursively, so a JSON file is strict JSON."""
    if isinstance(x, float) and (x != x or x in (math.inf, -math.inf)):
        return None
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [clean(v) for v in x]
    return x


def write_json(path: str, obj) -> None:
    """Write strict JSON atomically (a reader never sees half a file)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(clean(obj), f, indent=2)
    os.replace(tmp, path)


def nanmean(xs) -> float:
    """Mean of the values that are not None / NaN (NaN when none are)."""
    xs = [x for x in xs if x is not None and x == x]
    return sum(xs) / len(xs) if xs else float("nan")


def mean_std(xs) -> tuple[float, float]:
    """(mean, sample std) of the values that are not None / NaN; std NaN with fewer than two."""
    xs = [float(x) for x in xs if x is not None and x == x]
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")
    return m, sd


WRONG_ANSWERS = ("misaligned", "truncated")  # demo "defect" labels of records whose answer is wrong
_LABELS: dict[str, tuple | None] = {}


def record_labels(train_spec: str | None) -> tuple[list, list] | None:
    """Per-example (defect, task) labels of the training data, aligned with the trainer's examples (the demo set
    carries both), else None. Cached per file."""
    if not train_spec:
        return None
    if train_spec not in _LABELS:
        try:
            from optbatch_ds.data import load_examples

            examples = load_examples(train_spec)
            defects = [e.meta.get("defect") for e in examples]
            _LABELS[train_spec] = (defects, [e.task for e in examples]) if any(d is not None for d in defects) else None
        except Exception:  # a diagnostic only: never fail a report over it
            _LABELS[train_spec] = None
    return _LABELS[train_spec]
