"""The training recipe of launch/train.py, top to bottom: setup -> train steps -> save / evaluate -> finish.

Each step is DESIGN §2: step 1, the draw, here; steps 2-6 (score, gather, select, broadcast, train) in
`optbatch_ds.step`, the same functions the Hugging Face Trainer integration and offline pruning call.
Rank-0 files go through one `RunLog`; collectives are `comm`'s.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import time
from typing import NamedTuple

import torch

from optbatch_ds import comm, step as ob_step
from optbatch_ds.checkpoint import find_resume, latest_complete, load_rng
from optbatch_ds.comm import log0
from optbatch_ds.config import Resolved, RunConfig, parse_args, planned_steps
from optbatch_ds.data import EpochSampler
from optbatch_ds.errors import ConfigError, ResumeError
from optbatch_ds.evaluate import EvalSettings, evaluate, format_table
from optbatch_ds.keeping import Keeper
from optbatch_ds.modeling import check_environment
from optbatch_ds.signals import reference_files, reference_losses, task_groups
from optbatch_ds.runlog import RunLog, selection_line
from optbatch_ds.scoring import CurvaturePolicy, curvature_inv_sqrt
from optbatch_ds.session import Prepared, build_engine, prepare_data_and_model, resolve_here, seed_everything
from optbatch_ds.tracking import Tracker, check_report_to

# Estimated FLOPs per parameter and token (Kaplan et al. 2020): 6 for a trained token (forward 2 +
# backward 4), 2 for a scored token (forward only).
FLOPS_TRAIN, FLOPS_SCORE = 6.0, 2.0


class _Preemption:
    """SIGTERM (Slurm's preemption) asks for a checkpoint at the end of the current step."""

    def __enter__(self):
        self.requested = False
        self._old = signal.signal(signal.SIGTERM, self._handler)
        return self

    def _handler(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._old)


class StepOutcome(NamedTuple):
    record: dict          # the metrics.jsonl line
    selected: list[int]   # the dataset indices trained this step (all ranks)
    preempted: bool       # some rank got SIGTERM: save and leave


@dataclasses.dataclass
class Recipe:
    """One run's state on one rank; `loop` drives it. Built by `Recipe.setup` (collective)."""

    run: RunConfig
    rank: int
    out: str
    prep: Prepared
    rs: Resolved
    engine: object
    n_params: int
    rt: ob_step.SelectionRuntime
    sampler: EpochSampler
    log: RunLog
    total_steps: int
    keeper: Keeper
    keep_alive: object = None       # HfDeepSpeedConfig under ZeRO-3: must outlive the engine
    model_info: dict = dataclasses.field(default_factory=dict)   # attention, checkpointing, LoRA, curvature
    step: int = 0
    totals: dict = dataclasses.field(default_factory=lambda: {"samples_trained": 0, "samples_scored": 0,
                                                              "tokens_trained": 0, "flops": 0.0})
    last_ckpt: str | None = None
    history: list | None = None     # every step's selected indices (opt-in: grows with the run)
    t_run: float = 0.0
    step_seconds: float = 0.0       # this process's steps' own time, summed (start-up, saves, evaluations excluded)

    # ------------------------------------------------------------------ setup

    @classmethod
    def setup(cls, run: RunConfig, rank: int, world: int, local_rank: int) -> "Recipe":
        """config -> data -> model -> engine -> selection runtime -> resume. Collective."""
        out = os.path.abspath(run.output_dir)
        os.makedirs(out, exist_ok=True)
        seed_everything(run.seed)
        # checked before the data and model load: a typo or a missing package costs seconds, not minutes
        early = resolve_here(run, world)
        _check_before_loading(run, early)
        prep = prepare_data_and_model(run, local_rank, out)
        rs = resolve_here(run, world, num_train_samples=len(prep.pool))
        total_steps = planned_steps(run, len(prep.pool), rs.candidates)
        engine, n_params, keep_alive, info = build_engine(prep, rs)
        eps = rs.optbatch.eps
        policy = CurvaturePolicy.build(rs.optbatch, engine.module, adam=lambda: curvature_inv_sqrt(engine, eps))
        info["curvature"] = policy.source
        reference, ref_summary = reference_losses(rs.optbatch, prep.examples)
        doc = {**rs.to_json(), "model_path": prep.model_path, "train_data": prep.train_spec,
               "eval_data": prep.eval_spec, "planned_steps": total_steps, "reference": ref_summary, "model": info}
        log = RunLog(out, rank, tracker=Tracker.build(run.report_to, out, os.path.basename(out), doc, rank))
        log.write_json("config.json", doc)
        if log.active:
            prep.report.write(log.path("bad_records.json"))
        if prep.report.count():
            log0(f"skipped {prep.report.count()} records (listed in {out}/bad_records.json)")
        rt = ob_step.SelectionRuntime.build(engine.module, rs.optbatch, rs.sizes, prep.tokenizer.pad_token_id,
                                            policy, total_steps, rank)
        rt.attach(len(prep.encoded), reference, task_groups(e.task for e in prep.examples))
        rt.group_by_length = rt.scorer.by_length = run.group_by_length
        keeper = Keeper.build(rs, engine, prep, out, rank, keep_alive)
        recipe = cls(run, rank, out, prep, rs, engine, n_params, rt, EpochSampler(len(prep.pool), seed=run.seed),
                     log, total_steps, keeper, keep_alive, info)
        if ref_summary:  # the reference models' cost counts from step 0: FLOPs and time to quality include it
            recipe.totals.update(flops=ref_summary["flops"], reference_flops=ref_summary["flops"],
                                 reference_wall_s=ref_summary["wall_s"])
        log0(recipe._start_line(world))
        recipe._resume()
        log.resume_at(recipe.step)
        return recipe

    def _start_line(self, world: int) -> str:
        ob, rs, info, prep = self.rs.optbatch, self.rs, self.model_info, self.prep
        peft = info.get("peft")
        fit = (f"attn {info['attn_implementation']} | grad ckpt {'on' if info['gradient_checkpointing'] else 'off'} | "
               + (f"lora r {peft['r']}{' 4-bit' if peft['load_in_4bit'] else ''} "
                  f"({100.0 * info['trainable_params'] / max(self.n_params, 1):.2f}% trainable)" if peft
                  else "full fine-tuning") + f" | curvature {info['curvature']}")
        return (f"optbatch_ds | world {world} | model {prep.model_path} ({self.n_params / 1e6:.2f}M params) | {fit} | "
                f"train {len(prep.pool)} samples | method {ob.method}"
                + (f" (preset {ob.preset}: signal {ob.signal}, scoring {ob.scoring}"
                   + (f", prior {ob.prior})" if ob.stale else ")") if ob.method == "optbatch" else "")
                + f" | prune {ob.prune_ratio} | "
                f"b {rs.train_batch_size} of c {rs.candidates} per step | {self.total_steps} steps")

    @property
    def ckpt_root(self) -> str:
        return os.path.join(self.out, "checkpoints")

    def _resume(self) -> None:
        """Continue from --resume (a checkpoint, or 'auto'): engine, sampler, selector, curvature statistic, best
        evaluation, totals and RNG state."""
        resume_dir = find_resume(self.run.resume, self.ckpt_root)
        if resume_dir is not None:
            _, client = self.engine.load_checkpoint(os.path.dirname(resume_dir), tag=os.path.basename(resume_dir),
                                                    load_module_strict=not self.run.use_peft)
            if client is None:
                raise ResumeError(f"could not load checkpoint {resume_dir} (written by another model or DeepSpeed "
                                  "config?)")
            self.step = int(client["step"])
            warnings = self.sampler.load_state_dict(client["sampler"])
            warnings += self.rt.selector.load_state_dict(client["selector"])
            if "runtime" in client:  # recorded losses and sketches (stale scoring), the curvature statistic
                warnings += self.rt.load_state_dict(client["runtime"])
            self.keeper.load_state_dict(client.get("keeper"))
            self.totals = client["totals"]
            load_rng(resume_dir, self.rank)
            ob = self.rs.optbatch
            for key, value in client.get("config", {}).items():  # config and checkpoint disagreeing: name both
                if getattr(ob, key, value) != value:
                    warnings.append(f"resuming with optbatch.{key}={getattr(ob, key)!r} but the checkpoint was "
                                    f"written with {value!r}")
            for w in warnings:
                log0(f"warning: {w}")
            log0(f"resumed from {resume_dir} at step {self.step}")
        self.last_ckpt = latest_complete(self.ckpt_root)

    # ------------------------------------------------------------------ one step

    def train_step(self, preempt_requested: bool = False) -> StepOutcome:
        """DESIGN §2 steps 1-6 for the next pool, then the step's counters reduced over ranks and logged."""
        self.step += 1
        step, rt, sizes = self.step, self.rt, self.rs.sizes
        timers = ob_step.new_timers()
        t_step = t0 = time.perf_counter()
        # 1. draw: every rank computes the same pool
        cand = [self.prep.pool[p] for p in self.sampler.draw(sizes.candidates)]
        timers["draw"] = time.perf_counter() - t0
        # 2-5. score (rank r its slice, or recorded values), gather, select on rank 0, broadcast + agreement check
        choice = ob_step.choose_batch(rt, self.engine, self.prep.encoded, cand, step, timers)
        t0 = time.perf_counter()
        info = {**choice.info, **ob_step.diversity(rt, choice, step)} if self.rank == 0 else choice.info
        timers["diagnostics"] = time.perf_counter() - t0 if choice.sketches is not None else 0.0
        selected = [cand[p] for p in choice.positions.tolist()]
        if self.history is not None:
            self.history.append(selected)
        # 6. train on this rank's share, micro-batch by micro-batch (scoring stale: recording what it measures)
        t0 = time.perf_counter()
        dealt, weights = ob_step.deal(rt, self.prep.encoded, selected, choice.weights)
        trained = ob_step.train_on(rt, self.engine, self.prep.encoded, *ob_step.my_share(rt, dealt, weights), step,
                                   self.last_ckpt)
        timers["train"] = time.perf_counter() - t0 - trained.feature_s
        timers["features"] += trained.feature_s
        ob_step.record_training(rt, dealt, trained, step, timers)
        # the step's counters (and the preemption flag) summed over ranks in one collective
        stats = comm.sum_over_ranks(torch.tensor([trained.loss_sum, float(trained.tokens), float(choice.score_tokens),
                                                  1.0 if preempt_requested else 0.0, float(trained.positions)],
                                                 dtype=torch.float64))
        record = self._record(stats, timers, info, time.perf_counter() - t_step)
        self.log.step(record, selection_line(step, cand, selected, choice.weights, info, choice.losses))
        return StepOutcome(record, selected, bool(stats[3] > 0))

    def _record(self, stats: torch.Tensor, timers: dict, info: dict, step_time: float) -> dict:
        """Update the run's totals and return the step's metrics.jsonl line."""
        b, c, scored = self.rs.train_batch_size, self.rs.candidates, self.rs.optbatch.needs_scores
        self.totals["samples_trained"] += b
        self.totals["samples_scored"] += c if scored else 0
        self.totals["tokens_trained"] += int(stats[1])
        self.totals["flops"] += FLOPS_TRAIN * self.n_params * float(stats[1]) + FLOPS_SCORE * self.n_params * float(stats[2])
        self.step_seconds += step_time
        lr = self.engine.get_lr()
        return {"step": self.step, "epoch": self.sampler.epoch, "loss": float(stats[0]) / b,
                "lr": float(lr[0]) if lr else None, "candidates": c, "trained": b, "tokens": int(stats[1]),
                "score_tokens": int(stats[2]), "train_positions": int(stats[4]),
                "tokens_per_s": float(stats[1] + stats[2]) / max(step_time, 1e-9),
                "time": {k: round(v, 6) for k, v in {**timers, "total": step_time}.items()},
                "wall": round(time.perf_counter() - self.t_run, 3), **self.totals, **self._curvature_used(),
                **self._peak_memory(),
                **{k: v for k, v in info.items() if k in ob_step.LOGGED_INFO}}

    def _peak_memory(self) -> dict:
        """{"peak_memory_gib": the accelerator's peak allocation so far} on GPUs; {} on CPU (no such counter)."""
        if self.engine.device.type == "cpu":
            return {}
        from deepspeed.accelerator import get_accelerator

        return {"peak_memory_gib": round(get_accelerator().max_memory_allocated() / 2**30, 3)}

    def _curvature_used(self) -> dict:
        """The curvature source of this step's features ({} when no features are computed) and whether it had a
        statistic yet (False: the identity, e.g. before Adam's first step)."""
        if not self.rt.scorer.wants_curvature:
            return {}
        return {"curvature": self.rt.curvature.source, "curvature_ready": bool(self.rt.curvature.ready)}

    # ------------------------------------------------------------------ save, evaluate, finish

    def save(self, full: bool = False) -> str:
        """A checkpoint of this step (`Keeper.save`): DeepSpeed's, with the sampler, selector, curvature statistic,
        best evaluation, totals and RNG state, or the weights alone with --save-only-model (unless `full`).
        Collective."""
        client = {"step": self.step, "sampler": self.sampler.state_dict(), "selector": self.rt.selector.state_dict(),
                  "keeper": self.keeper.state_dict(),
                  "totals": dict(self.totals), "config": dataclasses.asdict(self.rs.optbatch)}
        # the recorded losses and sketches (rank 0's; every rank loads that file) and the curvature statistic
        client["runtime"] = self.rt.state_dict()
        path = self.keeper.save(self.step, client, full=full)
        if full or not self.run.save_only_model:
            self.last_ckpt = path
        return path

    def evaluate(self, final: bool = False) -> dict | None:
        """Held-out loss and generation metrics (rank 0 gets the result), logged and noted as the best if it is.
        With --export best, the best evaluation's weights are checkpointed if this step has none. Collective."""
        if not self.prep.eval_examples:
            return None
        t0 = time.perf_counter()
        settings = EvalSettings(batch_size=max(self.rs.micro_batch_size, 8), max_new_tokens=self.run.eval_max_new_tokens,
                                samples_per_task=self.run.eval_samples_per_task,
                                synced_gpus=self.rs.zero_stage == 3 and self.rs.world_size > 1)
        res = evaluate(self.engine, self.prep.tokenizer, self.prep.eval_examples, self.prep.eval_encoded, settings)
        if res is not None:
            res["step"] = self.step
            res["seconds"] = time.perf_counter() - t0
            log0(format_table(res))
        self.log.evaluation(res, final=final)
        self.keeper.note_evaluation(self.step, res)
        if not final and self.keeper.wants_checkpoint_for_best(self.step):
            self.save()
        return res

    def finish(self, start_step: int) -> dict:
        """The last checkpoint (unless this very step is saved), the final evaluation, rotation, the export."""
        if self.step > start_step or not os.path.isdir(self.keeper.tag_dir(self.step)):
            self.save()
        result = self.evaluate(final=True)
        self.keeper.rotate()  # the final evaluation may have made the last checkpoint the best
        if self.run.export != "none":
            exported = self.keeper.export(self.step)
            log0(f"exported step {exported} to {self.keeper.final_dir}"
                 + (" (adapter in final/adapter)" if self.run.use_peft else ""))
            if exported != self.step and self.keeper.best_result is not None:  # eval.json describes final/
                self.log.write_json("eval.json", {**self.keeper.best_result, "exported_step": exported})
                result = self.keeper.best_result
        return {"step": self.step, "eval": result, "totals": self.totals, "history": self.history, "rank": self.rank}

    def loop(self) -> dict:
        """Steps until the planned count (or early stopping, or SIGTERM), with --save-every / --eval-every, then
        `finish`. Collective. Returns `finish`'s dict, or {"preempted": True, ...} after a SIGTERM checkpoint."""
        run, start_step = self.run, self.step
        comm.set_collective_timeout(run.collective_timeout)  # a rank that stops answering is an error from here on
        self.log.start_progress(self.total_steps, start_step, run.log_every)
        self.engine.train()
        self.t_run = time.perf_counter()
        try:
            with _Preemption() as preempt:
                while self.step < self.total_steps:
                    if self.train_step(preempt.requested).preempted:  # save all and leave: a requeue resumes here
                        log0(f"SIGTERM: saved {self.save(full=True)} at step {self.step}; exiting for requeue")
                        return {"preempted": True, "step": self.step, "history": self.history, "rank": self.rank}
                    if run.save_every and self.step % run.save_every == 0 and self.step < self.total_steps:
                        self.save()
                    if run.eval_every and self.step % run.eval_every == 0 and self.step < self.total_steps:
                        self.evaluate()
                        if self.keeper.should_stop():
                            log0(f"early stopping at step {self.step}: no better held-out loss in "
                                 f"{run.early_stopping_patience} evaluations (best {self.keeper.best['loss']:.4f} "
                                 f"at step {self.keeper.best['step']})")
                            break
        finally:
            self.log.close()
        try:
            return self.finish(start_step)
        finally:
            self.log.end()


def _check_before_loading(run: RunConfig, rs: Resolved) -> None:
    """What the flags need from the machine and from each other, before any data or model loads (ConfigError)."""
    from deepspeed.accelerator import get_accelerator

    check_environment(run, get_accelerator().device_name())
    check_report_to(run.report_to)
    if run.use_peft and not run.lora_modules_to_save and rs.optbatch.curvature == "adam":
        raise ConfigError('"optbatch".curvature adam reads the Adam state of lm_head, which LoRA freezes; use "ema" '
                          '(or "auto"), or train lm_head with --lora-modules-to-save lm_head')
    if rs.optbatch.reference_losses:
        reference_files(rs.optbatch.reference_losses)


def train(run: RunConfig, rank: int, world: int, local_rank: int, record_history: bool = False) -> dict:
    """DESIGN §2 steps 1-6 every step, then save, evaluate and export. Collective: call on every rank.

    Returns {"step", "eval" (rank 0), "totals", "history" (each step's selected indices, with
    record_history), "rank"}, or {"preempted": True, ...} after a SIGTERM checkpoint."""
    r = Recipe.setup(run, rank, world, local_rank)
    r.history = [] if record_history else None
    return r.loop()


def main(argv=None) -> int:
    """launch/train.py: parse the flags, start the process group, train, clean up."""
    run = parse_args(argv)
    rank, world, local_rank = comm.init_distributed(run.collective_timeout)
    try:
        train(run, rank, world, local_rank)
    finally:
        comm.cleanup()
    return 0
