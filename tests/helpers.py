"""Shared pieces of the multi-rank and end-to-end tests."""
from __future__ import annotations

import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_body(rank, world_size, argv):
    """Run the real recipe on this rank (used with tests.dist_utils.run_distributed)."""
    os.chdir(REPO)
    from optbatch_ds import comm
    from optbatch_ds.config import parse_args
    from optbatch_ds.trainer import train

    run = parse_args(argv)
    r, w, local = comm.init_distributed(120)
    return train(run, r, w, local, record_history=True)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def load_safetensors(dir_):
    from safetensors.torch import load_file

    return load_file(os.path.join(dir_, "model.safetensors"))
