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
  2. each rank scores its c / W slice with the model being trained (`trainer.score_candidates`: no graph,
     loss + curvature-normalised output-layer features + sketch). The curvature is Adam's bias-corrected
     second moment of lm_head.weight (`scoring.curvature_inv_sqrt`): from the DeepSpeed engine
     (`self.model_wrapped`) under DeepSpeed, from the torch optimizer's state otherwise;
  3. gather to rank 0, which runs `Selector` (selector step = global step + 1); broadcast; agreement check;
  4. rank r trains on its b / W share, split into gradient_accumulation_steps micro-batches.

How it hooks in: the Trainer's loop fetches each optimizer step's micro-batches with one call,
`get_batch_samples(epoch_iterator, gradient_accumulation_steps, device)`, after the previous optimizer
step. This mixin overrides that call (steps 1-4 happen there, so the scores are on-policy) and
`get_train_dataloader`, which becomes a loader of placeholders with exactly gradient_accumulation_steps x
(usable rows // c) entries per rank, so the Trainer's own epochs, max_steps, LR schedule, gradient
accumulation, clipping, logging, evaluation, checkpointing and resume run unchanged. Resuming needs no
extra state: the draw and the selection are pure functions of (seed, global step).

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

import json
import logging
import os
import time
from types import SimpleNamespace

import torch
from transformers import Trainer

from optbatch_ds.config import ConfigError, OptBatchConfig, num_candidates

logger = logging.getLogger(__name__)

__all__ = ["OptBatchConfig", "OptBatchMixin", "OptBatchTrainer", "optbatch_config_from"]


def optbatch_config_from(optbatch, args) -> OptBatchConfig:
    """An OptBatchConfig, a dict of its fields, or None: the DeepSpeed JSON's "optbatch" section, else defaults."""
    if isinstance(optbatch, OptBatchConfig):
        return optbatch
    if isinstance(optbatch, dict):
        return OptBatchConfig.from_dict(optbatch)
    if optbatch is None:
        hf_ds = getattr(args, "hf_deepspeed_config", None)
        section = hf_ds.config.get("optbatch") if hf_ds is not None else None
        return OptBatchConfig.from_dict(section) if section else OptBatchConfig()
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


class _Scorer:
    """What `score_candidates` needs of an engine (.module, .device, a forward) for a model outside DeepSpeed."""

    def __init__(self, module, device):
        self.module, self.device = module, device

    def __call__(self, **kwargs):
        return self.module(**kwargs)


def _rank_world() -> tuple[int, int]:
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


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
        self._ob = None          # sizes, pool, sampler, selector: built with the train dataloader
        self._ob_pending = []    # selection info of the steps since the last training log

    # ------------------------------------------------------------------ setup

    def _optbatch_setup(self) -> SimpleNamespace:
        from optbatch_ds.selection import Selector

        ob, args = self.optbatch, self.args
        _, world = _rank_world()
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
        return SimpleNamespace(b=b, c=c, micro=micro, accum=accum, world=world, pool=pool, excluded=excluded,
                               seed=args.data_seed if args.data_seed is not None else args.seed,
                               sampler=None, draws=-1, selector=Selector(ob.selection_config()),
                               projection=None, projection_built=False, log_checked=False,
                               score_bs=ob.score_batch_size or 2 * micro)

    def _row(self, i: int) -> SimpleNamespace:
        row = self.train_dataset[i]
        ids = row["input_ids"]
        labels = row["labels"] if "labels" in row and row["labels"] is not None else ids
        as_list = (lambda x: x.tolist() if hasattr(x, "tolist") else list(x))
        return SimpleNamespace(input_ids=as_list(ids), labels=as_list(labels))

    def _usable_rows(self) -> tuple[list[int], int]:
        """Rows with at least one supervised label after the shift (labels[1:] != -100)."""
        pool = [i for i in range(len(self.train_dataset)) if any(t != -100 for t in self._row(i).labels[1:])]
        return pool, len(self.train_dataset) - len(pool)

    def get_train_dataloader(self):
        """Placeholders, gradient_accumulation_steps x (usable rows // c) per rank: the Trainer's epoch length."""
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        self._ob = st = self._optbatch_setup()
        n = (len(st.pool) // st.c) * st.accum * st.world  # accelerate gives each rank 1 / world of them
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
        if len(slots) != self._ob.accum:
            raise RuntimeError(f"optbatch: the Trainer asked for {len(slots)} micro-batches in a step, expected "
                               f"gradient_accumulation_steps={self._ob.accum}")
        batches = self._optbatch_step()
        count = getattr(self, "_get_num_items_in_batch", None)
        return batches, (count(batches, device) if count is not None else None)

    def _scorer(self):
        if self.is_deepspeed_enabled:
            return self.model_wrapped  # the DeepSpeedEngine: under ZeRO-3 its forward gathers the shards
        return _Scorer(self.model, self.args.device)  # the bare module: no DDP hooks for a no-grad forward

    def _curvature(self):
        from optbatch_ds.scoring import curvature_inv_sqrt

        # Under DeepSpeed the engine reads the (partitioned) Adam state through DeepSpeed's accessors;
        # otherwise curvature_inv_sqrt reads optimizer.state[lm_head.weight]["exp_avg_sq"] and bias-corrects.
        target = (self.model_wrapped if self.is_deepspeed_enabled
                  else SimpleNamespace(optimizer=self.optimizer, module=self.model))
        return curvature_inv_sqrt(target, self.optbatch.eps)

    def _projection(self, scorer):
        from optbatch_ds.trainer import sketch_projection

        st = self._ob
        if not st.projection_built:
            st.projection = sketch_projection(scorer.module, self.optbatch)
            st.projection_built = True
        return st.projection

    def _optbatch_step(self) -> list[dict]:
        from optbatch_ds.data import EpochSampler
        from optbatch_ds.trainer import choose_batch, collate

        st, ob = self._ob, self.optbatch
        rank, world = _rank_world()
        done = self.state.global_step
        step = done + 1
        if st.draws != done:  # first step of this train() call, or a resume: replay the draws (cheap)
            st.sampler = EpochSampler(len(st.pool), seed=st.seed)
            for _ in range(done):
                st.sampler.draw(st.c)
            st.draws = done
        timers = dict.fromkeys(("draw", "curvature", "score_forward", "features", "gather", "select", "broadcast"),
                               0.0)
        t0 = time.perf_counter()
        cand = [st.pool[p] for p in st.sampler.draw(st.c)]
        st.draws += 1
        cpr, bpr = st.c // world, st.b // world
        mine = cand[rank * cpr:(rank + 1) * cpr]
        timers["draw"] = time.perf_counter() - t0
        pad_id = getattr(self.processing_class, "pad_token_id", None)
        pad_id = 0 if pad_id is None else pad_id  # right padding is masked: any id will do

        scorer = self._scorer() if ob.needs_scores else None
        st.selector.total_steps = self.state.max_steps  # training progress, for a temperature schedule
        choice = choose_batch(scorer, [self._row(i) for i in mine], step, ob, st.selector, st.c, st.b, pad_id=pad_id,
                              projection=self._projection(scorer) if scorer is not None else None,
                              score_bs=st.score_bs, curvature=self._curvature, timers=timers, rank=rank)
        sel, weights, info = choice.positions, choice.weights, choice.info
        all_losses, all_sketches = choice.losses, choice.sketches
        if world > 1:
            box = [info]
            torch.distributed.broadcast_object_list(box, src=0)  # so every rank logs the same line
            info = box[0]
        selected = [cand[p] for p in sel.tolist()]
        self._optbatch_record(step, cand, selected, weights, info, timers, choice.curvature,
                              all_losses, all_sketches, rank)

        mine_sel, mine_w = selected[rank * bpr:(rank + 1) * bpr], weights[rank * bpr:(rank + 1) * bpr]
        weighted = not bool(torch.all(weights == 1))
        self._ob_weights = {}
        batches = []
        for m in range(st.accum):
            ids = mine_sel[m * st.micro:(m + 1) * st.micro]
            batch = collate([self._row(i) for i in ids], pad_id, torch.device("cpu"))
            if weighted:  # an id, not the weights: the Trainer would cast a float tensor to the DeepSpeed dtype
                self._ob_weights[m] = mine_w[m * st.micro:(m + 1) * st.micro]
                batch["optbatch_weight_id"] = torch.tensor(m)
            batches.append(batch)
        return batches

    def _optbatch_record(self, step, cand, selected, weights, info, timers, curvature, losses, sketches, rank):
        from optbatch_ds.trainer import _LOGGED_INFO

        info = info or {}
        self._ob_pending.append({**{k: info[k] for k in _LOGGED_INFO if k in info},
                                 "score_seconds": timers["score_forward"] + timers["features"],
                                 "select_seconds": timers["select"]})
        if self._ob_record:
            entry = {"step": step, "candidates": cand, "selected": selected, "weights": weights.tolist(),
                     "info": info, "curvature": curvature}
            if rank == 0:
                entry.update(losses=losses, sketches=sketches)
            self.optbatch_history.append(entry)
        if rank != 0:
            return
        path = os.path.join(self.args.output_dir, "selection.jsonl")
        os.makedirs(self.args.output_dir, exist_ok=True)
        if not self._ob.log_checked:  # a resumed run: drop the lines past the resumed step (a crashed tail)
            self._ob.log_checked = True
            if os.path.exists(path):
                keep = [l for l in open(path).read().splitlines() if l.strip() and json.loads(l)["step"] < step]
                with open(path, "w") as f:
                    f.writelines(l + "\n" for l in keep)
        line = {"step": step, "candidates": cand, "selected": selected}
        if not torch.all(weights == 1):
            line["weights"] = [round(float(x), 6) for x in weights]
        if "quotas" in info:
            line["quotas"] = info["quotas"]
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")

    # ------------------------------------------------------------------ loss and logging

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        wid = inputs.pop("optbatch_weight_id", None)
        if wid is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        from optbatch_ds.trainer import per_sample_nll

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
