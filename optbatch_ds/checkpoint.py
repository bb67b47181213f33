"""Checkpoint bookkeeping around DeepSpeed's save/load: completeness markers, resume lookup, RNG, rotation.

DeepSpeed writes one checkpoint tag (`checkpoints/step_000900/`) from every rank. A tag counts
as complete only once every rank has finished writing and rank 0 has then written `COMPLETE`;
a run killed mid-save leaves a tag without it, and `--resume auto` never picks that one.
A --save-only-model tag holds weights only (its marker says `"resumable": false`): never resumed from.
`rotate` keeps the newest N complete tags plus the best one (--save-total-limit).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time

import numpy as np
import torch

from optbatch_ds.errors import ResumeError

MARKER = "COMPLETE"
_TAG = re.compile(r"^step_(\d+)$")


def write_complete_marker(tag_dir: str, step: int, resumable: bool = True) -> None:
    """COMPLETE in tag_dir, atomically; resumable=False for a weights-only (--save-only-model) tag."""
    tmp = os.path.join(tag_dir, MARKER + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"step": step, "time": time.time(), "resumable": resumable}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(tag_dir, MARKER))  # atomic: a marker exists whole or not at all


def is_complete(tag_dir: str) -> bool:
    return os.path.exists(os.path.join(tag_dir, MARKER))


def is_resumable(tag_dir: str) -> bool:
    """Complete and not weights-only (markers written before --save-only-model existed count as resumable)."""
    if not is_complete(tag_dir):
        return False
    try:
        with open(os.path.join(tag_dir, MARKER)) as f:
            return bool(json.load(f).get("resumable", True))
    except (OSError, ValueError):
        return True


def tags(ckpt_root: str) -> list[tuple[int, str]]:
    """(step, path) of every `step_XXXXXX` under ckpt_root, complete or not, in step order."""
    if not os.path.isdir(ckpt_root):
        return []
    return sorted((int(m.group(1)), os.path.join(ckpt_root, name)) for name in os.listdir(ckpt_root)
                  if (m := _TAG.match(name)))


def latest_complete(ckpt_root: str, resumable: bool = True) -> str | None:
    """The newest complete `step_XXXXXX` under ckpt_root (zero-padded, so name order is step order); with
    resumable (the default) the newest one a run can continue from (not --save-only-model)."""
    for _, path in reversed(tags(ckpt_root)):
        if is_resumable(path) if resumable else is_complete(path):
            return path
    return None


def find_resume(resume: str | None, ckpt_root: str) -> str | None:
    """None (fresh start), 'auto' (latest resumable, or a fresh start if there is no complete one at all), or an
    explicit tag dir. Raises ResumeError (a FileNotFoundError) when an explicit path holds no complete checkpoint,
    or when the only complete checkpoints are weights-only (--save-only-model: a fresh start would overwrite them)."""
    if resume is None:
        return None
    if resume == "auto":
        found = latest_complete(ckpt_root)
        if found is None and latest_complete(ckpt_root, resumable=False) is not None:
            raise ResumeError(f"--resume auto: the checkpoints in {ckpt_root} hold weights only (--save-only-model) "
                              "and cannot be resumed; use a new --output-dir, or drop --resume to start over")
        return found
    path = os.path.abspath(resume)
    if os.path.isdir(path) and not _TAG.match(os.path.basename(path)):
        found = latest_complete(path if os.path.basename(path) == "checkpoints" else os.path.join(path, "checkpoints"))
        if found is None:
            raise ResumeError(f"--resume {resume}: no complete checkpoint below it")
        return found
    if not is_complete(path):
        raise ResumeError(f"--resume {resume}: not a complete checkpoint (no {MARKER} marker: "
                          f"the save was interrupted); use --resume auto to take the latest complete one")
    if not is_resumable(path):
        raise ResumeError(f"--resume {resume}: written with --save-only-model (weights only, no optimizer or "
                          "sampler state); load it with transformers instead, or resume from a full checkpoint")
    return path


def rotate(ckpt_root: str, keep: int, protect: tuple[str, ...] = ()) -> list[str]:
    """--save-total-limit: delete complete checkpoints beyond the `keep` newest, except those in `protect` (the
    best), and incomplete ones older than the newest complete (crashed saves). The newest complete checkpoint is
    never deleted (keep >= 1). Call on one process after every rank has finished saving. Returns what was deleted."""
    if keep < 1:
        return []
    found = tags(ckpt_root)
    complete = [(step, p) for step, p in found if is_complete(p)]
    if not complete:
        return []
    keepers = {os.path.abspath(p) for _, p in complete[-keep:]} | {os.path.abspath(p) for p in protect if p}
    doomed = [p for step, p in found if step <= complete[-1][0] and os.path.abspath(p) not in keepers]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def save_rng(tag_dir: str, rank: int) -> None:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    torch.save(state, os.path.join(tag_dir, f"rng_rank{rank:05d}.pt"))


def load_rng(tag_dir: str, rank: int) -> None:
    path = os.path.join(tag_dir, f"rng_rank{rank:05d}.pt")
    if not os.path.exists(path):  # a resume on more ranks than saved: keep this rank's seeded state
        return
    state = torch.load(path, weights_only=False)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
