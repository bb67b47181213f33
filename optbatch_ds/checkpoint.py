"""Checkpoint bookkeeping around DeepSpeed's save/load: completeness markers, resume lookup, RNG.

DeepSpeed writes one checkpoint tag (`checkpoints/step_000900/`) from every rank. A tag counts
as complete only once every rank has finished writing and rank 0 has then written `COMPLETE`;
a run killed mid-save leaves a tag without it, and `--resume auto` never picks that one.
"""
from __future__ import annotations

import json
import os
import random
import re
import time

import numpy as np
import torch

from optbatch_ds.errors import ResumeError

MARKER = "COMPLETE"
_TAG = re.compile(r"^step_(\d+)$")


def write_complete_marker(tag_dir: str, step: int) -> None:
    tmp = os.path.join(tag_dir, MARKER + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"step": step, "time": time.time()}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(tag_dir, MARKER))  # atomic: a marker exists whole or not at all


def is_complete(tag_dir: str) -> bool:
    return os.path.exists(os.path.join(tag_dir, MARKER))


def latest_complete(ckpt_root: str) -> str | None:
    """The newest complete `step_XXXXXX` under ckpt_root (zero-padded, so name order is step order)."""
    if not os.path.isdir(ckpt_root):
        return None
    tags = sorted((int(m.group(1)), name) for name in os.listdir(ckpt_root) if (m := _TAG.match(name)))
    for _, name in reversed(tags):
        if is_complete(os.path.join(ckpt_root, name)):
            return os.path.join(ckpt_root, name)
    return None


def find_resume(resume: str | None, ckpt_root: str) -> str | None:
    """None (fresh start), 'auto' (latest complete, or a fresh start if none), or an explicit tag dir.
    Raises ResumeError (a FileNotFoundError) when an explicit path holds no complete checkpoint."""
    if resume is None:
        return None
    if resume == "auto":
        return latest_complete(ckpt_root)
    path = os.path.abspath(resume)
    if os.path.isdir(path) and not _TAG.match(os.path.basename(path)):
        found = latest_complete(path if os.path.basename(path) == "checkpoints" else os.path.join(path, "checkpoints"))
        if found is None:
            raise ResumeError(f"--resume {resume}: no complete checkpoint below it")
        return found
    if not is_complete(path):
        raise ResumeError(f"--resume {resume}: not a complete checkpoint (no {MARKER} marker: "
                          f"the save was interrupted); use --resume auto to take the latest complete one")
    return path


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
