"""The files of a run directory, written by rank 0 through one object (a no-op on every other rank).

    log = RunLog(out_dir, rank, tracker=tracking.Tracker.build(...))   # tracker optional (--report-to)
    log.resume_at(step)                        # drop lines past the resumed step (a crashed run's tail)
    log.step(record, selection_line(...))      # metrics.jsonl + selection.jsonl, one line each per step
    log.evaluation(result, final=True)         # eval_history.jsonl (+ eval.json at the end)
    log.end()                                  # the tracker's last flush

The files are the source of truth; a tracker (tensorboard, wandb) gets the same numbers as they are written.

Shared by launch/train.py's recipe and the Hugging Face Trainer integration, so both write the same
line formats; bench and analysis read them back.
"""
from __future__ import annotations

import json
import math
import os

import torch

METRICS, SELECTION, EVAL, EVAL_HISTORY = "metrics.jsonl", "selection.jsonl", "eval.json", "eval_history.jsonl"


def selection_line(step: int, candidates: list, selected: list, weights: torch.Tensor, info: dict,
                   losses: torch.Tensor | None = None) -> dict:
    """One line of selection.jsonl: dataset indices of the pool and of the chosen batch, the loss weights when
    any differs from 1, the strata quotas, and (when scored) every candidate's loss for offline analysis."""
    line = {"step": step, "candidates": candidates, "selected": selected}
    if not torch.all(weights == 1):
        line["weights"] = [round(float(x), 6) for x in weights]
    if "quotas" in info:
        line["quotas"] = info["quotas"]
    if losses is not None:
        line["losses"] = [round(x, 4) if math.isfinite(x) else None for x in losses.tolist()]
    return line


class RunLog:
    """Rank 0 writes, other ranks do nothing: call sites never branch on the rank."""

    def __init__(self, out_dir: str, rank: int, tracker=None):
        self.out = out_dir
        self.active = rank == 0
        self.tracker = tracker if self.active else None   # a tracking.Tracker, or None
        self._progress = None
        self._log_every = 0

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def resume_at(self, step: int, names: tuple[str, ...] = (METRICS, SELECTION)) -> None:
        """Keep the lines of steps <= `step` (none on a fresh start): a killed run may have written past its
        last checkpoint, and the resumed run writes those steps again."""
        if not self.active:
            return
        os.makedirs(self.out, exist_ok=True)
        for name in names:
            path = self.path(name)
            lines = open(path).read().splitlines() if os.path.exists(path) and step > 0 else []
            with open(path, "w") as f:
                f.writelines(l + "\n" for l in lines if l.strip() and json.loads(l).get("step", 0) <= step)

    def write_json(self, name: str, doc: dict) -> None:
        """A whole JSON file (config.json, eval.json), indented."""
        if self.active:
            with open(self.path(name), "w") as f:
                json.dump(doc, f, indent=2, default=str)

    def append(self, name: str, line: dict) -> None:
        if self.active:
            with open(self.path(name), "a") as f:
                f.write(json.dumps(line) + "\n")

    def step(self, record: dict, selection: dict | None = None) -> None:
        """One step: its metrics line, its selection line, the progress bar and (every log_every) a text line."""
        if not self.active:
            return
        self.append(METRICS, record)
        if selection is not None:
            self.append(SELECTION, selection)
        if self.tracker is not None:
            self.tracker.log_step(record)
        if self._progress is not None:
            self._progress.update(1)
            self._progress.set_postfix_str(f"loss {record['loss']:.4f} | {record['tokens_per_s']:.0f} tok/s",
                                           refresh=False)
            if self._log_every and record["step"] % self._log_every == 0:
                self._progress.write(step_line(record))

    def evaluation(self, result: dict | None, final: bool = False) -> None:
        """An evaluation: one eval_history.jsonl line (without the sample predictions); at the end, eval.json."""
        if not self.active or result is None:
            return
        if final:
            self.write_json(EVAL, result)
        self.append(EVAL_HISTORY, {k: v for k, v in result.items() if k != "samples"})
        if self.tracker is not None:
            self.tracker.log_eval(result)

    def start_progress(self, total: int, initial: int, log_every: int) -> None:
        if self.active:
            from tqdm import tqdm

            self._progress = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, mininterval=1.0)
            self._log_every = log_every

    def close(self) -> None:
        """The progress bar ends (the run's files stay open for the final evaluation)."""
        if self._progress is not None:
            self._progress.close()
            self._progress = None

    def end(self) -> None:
        """The tracker's last flush (after the final evaluation)."""
        if self.tracker is not None:
            self.tracker.finish()
            self.tracker = None


def step_line(record: dict) -> str:
    """The one pipe-separated text line of a step."""
    t = record["time"]
    return (f"step {record['step']:6d} | loss {record['loss']:.4f} | kept {record['trained']}/{record['candidates']} | "
            f"score {t['score_forward'] + t['features']:.3f}s | sel {t['select']:.3f}s | "
            f"comm {t['gather'] + t['broadcast']:.3f}s | train {t['train']:.3f}s | {record['tokens_per_s']:.0f} tok/s")
