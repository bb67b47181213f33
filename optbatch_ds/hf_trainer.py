"""OptBatch selection inside `transformers.Trainer`: plain, DDP, or the Trainer's DeepSpeed integration.

    from transformers import Trainer, TrainingArguments
    from optbatch_ds.hf_trainer import OptBatchConfig, OptBatchMixin, OptBatchTrainer

    args = TrainingArguments(output_dir="out", per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             max_steps=1000, logging_steps=10, deepspeed="my_zero3.json")  # or no deepspeed
    trainer = OptBatchTrainer(model=model, args=args,
                              train_dataset=tokenized,      # rows with input_ids and labels (-100: no loss)
                              optbatch=OptBatchConfig(method="optbatch", prune_ratio=0.3))
    trainer.train()

    # TRL, or any other Trainer subclass: put the mixin first
    class OptBatchSFTTrainer(OptBatchMixin, SFTTrainer):
        pass

`optbatch` may also be a dict, or None to read the "optbatch" section of the DeepSpeed JSON given to
TrainingArguments(deepspeed=...) (the layout of ds_configs/*.json; DeepSpeed ignores that key), else the
defaults. Per optimizer step, with b = per_device_train_batch_size x gradient_accumulation_steps x world
size and c = ceil(b / (1 - prune_ratio)) rounded to a multiple of the world size (as in launch/train.py):

  1. draw c dataset indices from `EpochSampler(len(usable rows), seed=args.data_seed or args.seed)`;
  2. each rank scores its c / W slice with the model being trained (`step.choose_batch`, the step
     launch/train.py runs too: no graph,
     loss + curvature-normalised output-layer features + sketch). The curvature follows the "curvature" key
     (`scoring.CurvaturePolicy`): adam is Adam's bias-corrected second moment of lm_head.weight
     (`scoring.curvature_inv_sqrt`: from the DeepSpeed engine (`self.model_wrapped`) under DeepSpeed, from the
     torch optimizer's state otherwise); ema a running row statistic of the forwards that compute features
     (scoring passes, and the training forwards under scoring stale), which a PEFT model with a frozen lm_head
     gets under "auto" (adam with a frozen lm_head is a ConfigError). The statistic is saved in each Trainer
     checkpoint (optbatch_state.pt) with the selection's per-sample state;
  3. gather to rank 0, which runs `Selector` (selector step = global step + 1); broadcast; agreement check;
  4. rank r trains on its b / W share, split into gradient_accumulation_steps micro-batches.

How it hooks in: the Trainer's loop fetches each optimizer step's micro-batches with one call,
`get_batch_samples(epoch_iterator, gradient_accumulation_steps, device)`, after the previous optimizer
step. This mixin overrides that call (steps 1-4 happen there, so the scores are on-policy) and
`get_train_dataloader`, which becomes a loader of placeholders with exactly gradient_accumulation_steps x
(usable rows // c) entries per rank, so the Trainer's own epochs, max_steps, LR schedule, gradient
accumulation, clipping, logging, evaluation, checkpointing and resume run unchanged. The draw and the
selection are pure functions of (seed, global step); the per-sample state some settings keep (recorded
losses and sketches: scoring "stale", signals "neighbours", "progress" and "truncation") is saved as
`optbatch_state.pt` in every Trainer checkpoint folder and comes back on `train(resume_from_checkpoint=...)`. With scoring
"stale" the loss and sketch of each trained row are computed from the Trainer's own training forward
(`compute_loss`), as launch/train.py does.

The training batches are right-padded from each row's `input_ids` and `labels` (other columns and the
Trainer's data_collator are not used for training; evaluation is untouched); the loss is the Trainer's
own, except with per-sample weights (infobatch; optbatch with reweight "strata"), which need a per-sample
loss (`compute_loss`). Rows with no
supervised label are left out of the pool and counted (warning). Every training log line (logging_steps)
gains `optbatch/*` entries averaged over the steps since the previous one (mean candidate and selected
loss, stratum quotas, scoring and selection seconds); rank 0 appends one line per step to
`<output_dir>/selection.jsonl`, as launch/train.py does. `train_sampling_strategy` does not apply.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from transformers import Trainer

from optbatch_ds import comm, step as ob_step
from optbatch_ds.batching import collate, per_sample_nll
from optbatch_ds.config import BatchSizes, ConfigError, OptBatchConfig, num_candidates
from optbatch_ds.data import EpochSampler
from optbatch_ds.runlog import SELECTION, RunLog, selection_line
from optbatch_ds.scoring import CurvaturePolicy, LmHeadInput, curvature_inv_sqrt, output_layer_trains

logger = logging.getLogger(__name__)
OPTBATCH_STATE = "optbatch_state.pt"  # in each Trainer checkpoint folder: the selection's per-sample state

__all__ = ["OptBatchConfig", "OptBatchMixin", "OptBatchTrainer", "optbatch_config_from"]


def optbatch_config_from(optbatch, args) -> OptBatchConfig:
    """An OptBatchConfig, a dict of its fields, or None: the DeepSpeed JSON's "optbatch" section, else defaults
    (a Trainer fine-tunes a pretrained model: without a "preset" key, the "finetune" preset)."""
    if isinstance(optbatch, OptBatchConfig):
        return optbatch
    if isinstance(optbatch, dict):
        return OptBatchConfig.from_dict(optbatch, pretrained=True)
    if optbatch is None:
        hf_ds = getattr(args, "hf_deepspeed_config", None)
        section = hf_ds.config.get("optbatch") if hf_ds is not None else None
        return OptBatchConfig.from_dict(section or {}, pretrained=True)
    raise TypeError(f"optbatch must be an OptBatchConfig, a dict or None, got {type(optbatch).__name__}")


class _Slots(torch.utils.data.Dataset):
    """What the Trainer's loader iterates: one placeholder per micro-batch (the real batch is chosen later)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


def _collate_slots(items):
    return {"optbatch_slot": torch.tensor(items)}


class _Bare:
    """A model outside DeepSpeed seen as the step functions see an engine (.module, .device, a forward)."""

    def __init__(self, module, device):
        self.module, self.device = module, device

    def __call__(self, **kwargs):
        return self.module(**kwargs)


class _Row:
    """One training row as the step functions read it (input_ids and labels lists)."""

    def __init__(self, row):
        ids = row["input_ids"]
        labels = row["labels"] if "labels" in row and row["labels"] is not None else ids
        as_list = (lambda x: x.tolist() if hasattr(x, "tolist") else list(x))
        self.input_ids, self.labels = as_list(ids), as_list(labels)


class _Rows:
    """The train dataset as a sequence of `_Row`s (for `step.train_on`-style indexing)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, i: int) -> _Row:
        return _Row(self.dataset[i])


def _groups_by_length(args) -> bool:
    """Whether the TrainingArguments ask for length grouping: `group_by_length` up to transformers 4.x,
    `train_sampling_strategy="group_by_length"` from 5.x (which dropped the boolean)."""
    return bool(getattr(args, "group_by_length", False)) or \
        getattr(args, "train_sampling_strategy", None) == "group_by_length"


@dataclass
class _Run:
    """Built with the train dataloader: the shared step's runtime, the usable rows, the draw stream, the log."""

    rt: ob_step.SelectionRuntime
    pool: list[int]
    seed: int
    log: RunLog
    sampler: EpochSampler | None = None
    draws: int = -1          # draws taken from `sampler` (a resume replays them)
    log_checked: bool = False
    measured: list | None = None   # scoring stale: this step's (ids, losses, sketches) from compute_loss
    dealt: list | None = None      # the step's samples in rank order (what the measurements are gathered in)
    train_curvature: object = None  # scoring stale: the curvature of this step's training forwards (ema: their stats)


class OptBatchMixin:
    """Adds OptBatch selection to a `transformers.Trainer` subclass (see the module docstring).

    optbatch: OptBatchConfig, dict, or None (DeepSpeed JSON section, else defaults).
    record_history: keep every step's {step, candidates, selected, weights, info, curvature} in
        `self.optbatch_history` on every rank, plus the gathered losses and sketches on rank 0 (for tests
        and debugging: memory grows with the number of steps).
    """

    def __init__(self, *args, optbatch=None, record_history: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.optbatch = optbatch_config_from(optbatch, self.args)
        self.optbatch_history: list[dict] = []
        self._ob_record = bool(record_history)
        self._ob: _Run | None = None   # built with the train dataloader
        self._ob_pending = []          # selection info of the steps since the last training log
        self._ob_weights = {}

    # ------------------------------------------------------------------ setup

    def _optbatch_setup(self) -> _Run:
        ob, args = self.optbatch, self.args
        rank, world = comm.rank_and_world()
        if ob.signal == "reducible":  # rows are token ids: no conversation to find a record's reference loss by
            raise ConfigError('"optbatch".signal: reducible needs launch/train.py (reference losses are matched to '
                              'records by their conversation); use signal "loss" here')
        micro, accum = self._train_batch_size, args.gradient_accumulation_steps
        b = micro * accum * world
        c = num_candidates(b, ob.prune_ratio, world)
        if ob.method == "optbatch" and ob.strata > c:
            raise ConfigError(f'"optbatch".strata {ob.strata} is more than the {c} candidates per step; '
                              f"use strata <= {c} or a larger batch")
        pool, excluded = self._usable_rows()
        if len(pool) < c:
            raise ConfigError(f"the training set has {len(pool)} usable rows, fewer than the {c} candidates of "
                              "one step; lower the batch size or the prune ratio, or add data")
        if excluded:
            logger.warning("optbatch: %d of %d training rows have no supervised label (labels all -100) and are "
                           "left out of the pool", excluded, len(pool) + excluded)
        pad_id = getattr(self.processing_class, "pad_token_id", None)
        pad_id = 0 if pad_id is None else pad_id  # right padding is masked: any id will do
        # the "curvature" key, resolved on the model as given (a PEFT model with a frozen lm_head: ema under auto)
        policy = CurvaturePolicy.build(ob, self.model, adam=self._curvature)
        logger.info("optbatch: curvature %s (lm_head %s)", policy.source,
                    "trained" if output_layer_trains(self.model) else "frozen")
        rt = ob_step.SelectionRuntime.build(self.model, ob, BatchSizes(c, b, micro, accum, world), pad_id,
                                            policy, None, rank)
        rt.group_by_length = _groups_by_length(args)  # within each step: the step's samples stay the same
        rt.attach(len(self.train_dataset))
        resume = getattr(self, "_ob_resume", None)
        if resume and os.path.exists(os.path.join(resume, OPTBATCH_STATE)):
            for warning in rt.load_state_dict(torch.load(os.path.join(resume, OPTBATCH_STATE), weights_only=False)):
                logger.warning("optbatch: %s", warning)
        return _Run(rt, pool, args.data_seed if args.data_seed is not None else args.seed,
                    RunLog(args.output_dir, rank))

    def _usable_rows(self) -> tuple[list[int], int]:
        """Rows with at least one supervised label after the shift (labels[1:] != -100)."""
        rows = _Rows(self.train_dataset)
        pool = [i for i in range(len(self.train_dataset)) if any(t != -100 for t in rows[i].labels[1:])]
        return pool, len(self.train_dataset) - len(pool)

    def get_train_dataloader(self):
        """Placeholders, gradient_accumulation_steps x (usable rows // c) per rank: the Trainer's epoch length."""
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        self._ob = run = self._optbatch_setup()
        sizes = run.rt.sizes
        n = (len(run.pool) // sizes.candidates) * sizes.grad_accum * sizes.world  # accelerate gives each rank 1/world
        loader = torch.utils.data.DataLoader(_Slots(n), batch_size=1, shuffle=False, collate_fn=_collate_slots)
        return self.accelerator.prepare(loader)

    # ------------------------------------------------------------------ the OptBatch step

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        slots = []
        for _ in range(num_batches):
            try:
                slots.append(next(epoch_iterator))
            except StopIteration:
                break
        if not slots:
            return [], None
        if len(slots) != self._ob.rt.sizes.grad_accum:
            raise RuntimeError(f"optbatch: the Trainer asked for {len(slots)} micro-batches in a step, expected "
                               f"gradient_accumulation_steps={self._ob.rt.sizes.grad_accum}")
        batches = self._optbatch_step()
        count = getattr(self, "_get_num_items_in_batch", None)
        return batches, (count(batches, device) if count is not None else None)

    def _engine(self):
        if self.is_deepspeed_enabled:
            return self.model_wrapped  # the DeepSpeedEngine: under ZeRO-3 its forward gathers the shards
        return _Bare(self.model, self.args.device)  # the bare module: no DDP hooks for a no-grad forward

    def _curvature(self):
        # Under DeepSpeed the engine reads the (partitioned) Adam state through DeepSpeed's accessors;
        # otherwise curvature_inv_sqrt reads optimizer.state[lm_head.weight]["exp_avg_sq"] and bias-corrects.
        target = (self.model_wrapped if self.is_deepspeed_enabled
                  else SimpleNamespace(optimizer=self.optimizer, module=self.model))
        return curvature_inv_sqrt(target, self.optbatch.eps)

    def _optbatch_step(self) -> list[dict]:
        run = self._ob
        rt, sizes = run.rt, run.rt.sizes
        done = self.state.global_step
        step = done + 1
        if run.draws != done:  # first step of this train() call, or a resume: replay the draws (cheap)
            run.sampler = EpochSampler(len(run.pool), seed=run.seed)
            for _ in range(done):
                run.sampler.draw(sizes.candidates)
            run.draws = done
        timers = ob_step.new_timers()
        self._record_measured(done, timers)
        t0 = time.perf_counter()
        cand = [run.pool[p] for p in run.sampler.draw(sizes.candidates)]
        run.draws += 1
        rows = _Rows(self.train_dataset)
        timers["draw"] = time.perf_counter() - t0
        rt.selector.total_steps = self.state.max_steps  # training progress, for a temperature schedule
        choice = ob_step.choose_batch(rt, self._engine(), rows, cand, step, timers)
        info = comm.broadcast_object(choice.info)  # so every rank logs the same line
        selected = [cand[p] for p in choice.positions.tolist()]
        self._optbatch_record(step, cand, selected, choice, info, timers)

        run.dealt, dealt_w = ob_step.deal(rt, rows, selected, choice.weights)
        mine_sel, mine_w = ob_step.my_share(rt, run.dealt, dealt_w)
        run.measured = [] if rt.optbatch.stale else None
        weighted = not bool(torch.all(choice.weights == 1))
        self._ob_weights = {}
        batches = []
        for m in range(sizes.grad_accum):
            micro = slice(m * sizes.micro_batch_size, (m + 1) * sizes.micro_batch_size)
            batch = collate([rows[i] for i in mine_sel[micro]], rt.pad_id, torch.device("cpu"))
            if weighted:  # an id, not the weights: the Trainer would cast a float tensor to the DeepSpeed dtype
                self._ob_weights[m] = mine_w[micro]
                batch["optbatch_weight_id"] = torch.tensor(m)
            if run.measured is not None:  # which micro-batch: compute_loss records what its forward measured
                batch["optbatch_micro"] = torch.tensor(m)
            batches.append(batch)
        return batches

    def _record_measured(self, step: int, timers: dict) -> None:
        """Scoring stale: what the previous step's training forwards measured, gathered to rank 0's store."""
        run = self._ob
        if not run.measured:
            return
        ob_step.fold_curvature(run.rt, run.train_curvature, timers)  # ema: the training forwards' row statistics
        run.train_curvature = None
        losses = torch.cat([m[0] for m in run.measured])
        sketches = torch.cat([m[1] for m in run.measured]) if run.measured[0][1] is not None else None
        ob_step.record_training(run.rt, run.dealt, ob_step.Trained(0.0, 0, 0, losses, sketches), step, timers)
        run.measured = None

    def _optbatch_record(self, step: int, cand: list, selected: list, choice: ob_step.Choice, info: dict,
                         timers: dict) -> None:
        """The step's selection: pending log entries, the opt-in history, and a selection.jsonl line (rank 0)."""
        run = self._ob
        self._ob_pending.append({**{k: info[k] for k in ob_step.LOGGED_INFO if k in info},
                                 "score_seconds": timers["score_forward"] + timers["features"],
                                 "select_seconds": timers["select"]})
        if self._ob_record:
            entry = {"step": step, "candidates": cand, "selected": selected, "weights": choice.weights.tolist(),
                     "info": info, "curvature": choice.curvature, "curvature_source": run.rt.curvature.source}
            if run.rt.rank == 0:
                entry.update(losses=choice.losses, sketches=choice.sketches)
            self.optbatch_history.append(entry)
        if not run.log_checked:  # a resumed run: drop the lines past the resumed step (a crashed tail)
            run.log_checked = True
            run.log.resume_at(step - 1, names=(SELECTION,))
        line = selection_line(step, cand, selected, choice.weights, info, choice.losses)
        if run.rt.scorer.wants_curvature:  # the source of this step's curvature, as launch/train.py logs it
            ready = bool(choice.curvature) or bool(getattr(run.rt.curvature, "ready", False))
            line.update(curvature=run.rt.curvature.source, curvature_ready=ready)
        run.log.append(SELECTION, line)

    # ------------------------------------------------------------------ checkpoints

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """transformers.Trainer.train, remembering which checkpoint it resumes from: the per-sample state of the
        selection (recorded losses and sketches) comes back from it with the train dataloader."""
        if isinstance(resume_from_checkpoint, bool) and resume_from_checkpoint:
            from transformers.trainer_utils import get_last_checkpoint

            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir) or resume_from_checkpoint
        self._ob_resume = resume_from_checkpoint if isinstance(resume_from_checkpoint, str) else None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        """The Trainer's checkpoint plus the selection's per-sample state (rank 0's store; every rank's flags)."""
        super()._save_checkpoint(model, trial)
        if self._ob is not None and self.args.should_save and (self._ob.rt.measured is not None or
                                                               self._ob.rt.curvature.source == "ema"):
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            torch.save(self._ob.rt.state_dict(), os.path.join(folder, OPTBATCH_STATE))

    # ------------------------------------------------------------------ loss and logging

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        micro = inputs.pop("optbatch_micro", None)
        if micro is not None:  # scoring stale: the loss and sketch of each sample, from this very forward
            capture = LmHeadInput(self.model)
            try:
                loss, outputs = self._compute_loss(model, inputs, True, num_items_in_batch)
            finally:
                capture.remove()
            with torch.no_grad():
                run = self._ob
                if run.train_curvature is None:  # once per step, on every rank (collective for adam)
                    run.train_curvature = ob_step.pass_curvature(run.rt, self.state.global_step + 1, {"curvature": 0.0})
                l, f = run.rt.scorer.signals(capture.value.detach(), outputs.logits.detach(), inputs["labels"],
                                             run.train_curvature)
            run.measured.append((l.float().cpu(), f.float().cpu() if f is not None else None))
            return (loss, outputs) if return_outputs else loss
        return self._compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _compute_loss(self, model, inputs, return_outputs, num_items_in_batch):
        """The Trainer's own loss, or with per-sample weights (infobatch, reweight) their weighted mean."""
        wid = inputs.pop("optbatch_weight_id", None)
        if wid is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        # infobatch / reweight "strata": a sample counts w times (mean 1 over the batch); a per-rank mean of weighted
        # per-sample losses, which DDP / DeepSpeed average over ranks.
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        per = per_sample_nll(outputs.logits, inputs["labels"])
        loss = (per * self._ob_weights[int(wid)].to(per.device)).mean()
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:  # the Trainer's own rule for whether it divides by the accumulation steps
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or \
                self.compute_loss_func is not None
        if scaled:
            loss = loss / self.current_gradient_accumulation_steps
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        if "loss" in logs and self._ob_pending:
            pending, self._ob_pending = self._ob_pending, []
            for key in ("mean_loss_candidates", "mean_loss_selected", "drop_rate", "score_seconds",
                        "select_seconds"):
                vals = [p[key] for p in pending if p.get(key) is not None]
                if vals:
                    logs[f"optbatch/{key}"] = sum(vals) / len(vals)
            quotas = [p["quotas"] for p in pending if "quotas" in p]
            for s in range(len(quotas[0]) if quotas else 0):
                logs[f"optbatch/quota_{s}"] = sum(q[s] for q in quotas) / len(quotas)
        return super().log(logs, *args, **kwargs)


class OptBatchTrainer(OptBatchMixin, Trainer):
    """`transformers.Trainer` with OptBatch selection (module docstring)."""
