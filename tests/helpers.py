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


def zero3_argv(out, *extra, eval_samples: int = 2, eval_tokens: int = 8) -> list[str]:
    """launch/train.py flags for a short ZeRO-3 test run into `out`, with a small generation evaluation."""
    return ["--deepspeed", "ds_configs/zero3.json", "--output-dir", str(out), "--eval-samples-per-task",
            str(eval_samples), "--eval-max-new-tokens", str(eval_tokens), "--log-every", "0", *extra]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def load_safetensors(dir_):
    from safetensors.torch import load_file

    return load_file(os.path.join(dir_, "model.safetensors"))
