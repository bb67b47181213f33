"""Experiment trackers (--report-to tensorboard | wandb), fed by `runlog.RunLog`.

    tracker = Tracker.build("tensorboard", out_dir, run_name="default", config=resolved_json, rank=rank)
    log = RunLog(out_dir, rank, tracker=tracker)      # every metrics.jsonl line and evaluation also goes here
    ...
    tracker.finish()

metrics.jsonl stays the source of truth: a tracker gets the numeric scalars of each line (loss, lr, tokens/s,
the candidates' and kept set's mean loss, the time of each part of the step, ...) and of each evaluation
(eval/loss, eval/<task>/<metric>). Only rank 0 builds one; elsewhere `Tracker.build` returns a no-op.
wandb runs offline (WANDB_MODE=offline, files under output_dir/wandb) when WANDB_MODE is unset and its server
cannot be reached in 3 s, so a cluster node without internet still keeps the run (`wandb sync` uploads it later).

The writers are the maintained ones accelerate's and transformers' trackers wrap: `torch.utils.tensorboard`'s
SummaryWriter and `wandb.init`. accelerate.tracking itself is not used: in accelerate 1.15 its trackers log
through accelerate's logger, which demands an initialised `PartialState`, and building one inside a running
DeepSpeed job rewrites RANK / WORLD_SIZE and the CPU thread count of the process.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import socket

from optbatch_ds.errors import ConfigError

WANDB_HOST = ("api.wandb.ai", 443)


def check_report_to(report_to: str) -> None:
    """The tracker's package is installed (ConfigError naming the install command otherwise); before anything loads."""
    need = {"tensorboard": ("tensorboard", 'pip install -e ".[trackers]" (or pip install tensorboard)'),
            "wandb": ("wandb", 'pip install -e ".[wandb]" (or pip install wandb)')}.get(report_to)
    if need and importlib.util.find_spec(need[0]) is None:
        raise ConfigError(f"--report-to {report_to} needs the {need[0]} package: {need[1]}")


def _online(host: tuple[str, int] = WANDB_HOST, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(host, timeout=timeout):
            return True
    except OSError:
        return False


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a metrics line or an evaluation, flattened ("time/train", "eval/qa/bleu4")."""
    out = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalars(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


class _TensorBoard:
    def __init__(self, logging_dir: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(logging_dir)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```")

    def log(self, values: dict, step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)

    def flush(self) -> None:
        self.writer.flush()

    def finish(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, out_dir: str, run_name: str, config: dict):
        import wandb

        if "WANDB_MODE" not in os.environ and not _online():
            os.environ["WANDB_MODE"] = "offline"
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "optbatch_ds"), name=run_name, dir=out_dir,
                              config=config)

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def flush(self) -> None:
        pass

    def finish(self) -> None:
        self.run.finish()


class Tracker:
    """One tracker, or nothing (`active` False): `log_step`, `log_eval`, `finish` are safe either way."""

    def __init__(self, tracker=None):
        self.tracker = tracker

    @property
    def active(self) -> bool:
        return self.tracker is not None

    @classmethod
    def build(cls, report_to: str, out_dir: str, run_name: str, config: dict, rank: int) -> "Tracker":
        """Event files in out_dir/runs/<run_name> (tensorboard, the resolved config as a text summary), a wandb run
        (project $WANDB_PROJECT or optbatch_ds, offline without network), or a no-op for "none" and on every rank
        but 0. Raises ConfigError when the tracker's package is missing."""
        if rank != 0 or report_to == "none":
            return cls()
        check_report_to(report_to)
        if report_to == "tensorboard":
            return cls(_TensorBoard(os.path.join(out_dir, "runs", run_name), config))
        return cls(_WandB(out_dir, run_name, config))

    def log_step(self, record: dict) -> None:
        """A metrics.jsonl line's numbers as train/<key> at its step."""
        if self.active:
            self.tracker.log(scalars({k: v for k, v in record.items() if k != "step"}, "train/"), record["step"])

    def log_eval(self, result: dict) -> None:
        """An evaluation's numbers as eval/<key> (eval/loss, eval/tasks/<task>/<metric>) at its step; flushed."""
        if self.active:
            body = {k: v for k, v in result.items() if k not in ("samples", "step")}
            self.tracker.log(scalars(body, "eval/"), int(result.get("step", 0)))
            self.tracker.flush()

    def finish(self) -> None:
        if self.active:
            self.tracker.finish()
            self.tracker = None
