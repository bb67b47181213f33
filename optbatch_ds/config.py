"""Typed configuration: command line < DeepSpeed JSON ("optbatch" section) < flag overrides.

One JSON describes the whole run: DeepSpeed's own keys, plus an `"optbatch"` section that
DeepSpeed never sees (it is popped here). Every field carries help text; unknown keys and flags
are errors raised before any training starts, with the nearest valid name in the message.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

DEFAULT_EPOCHS_DEMO = 8  # the built-in model needs several passes over the toy set to show learning
DEFAULT_EPOCHS = 3
DEFAULT_LR_SMALL_MODEL = 1e-3
DEFAULT_LR_PRETRAINED = 2e-5
METHODS = ("full", "random", "online_hard", "ccs", "infobatch", "optbatch")
FEATURES = ("grad_curvature", "grad_raw", "hidden")


class ConfigError(ValueError):
    """A configuration a run cannot start with; the message names the key and the fix."""


def _nearest(name: str, valid) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid: {', '.join(sorted(valid))}"


def _help(text: str, default=dataclasses.MISSING):
    return field(default=default, metadata={"help": text})


@dataclass
class OptBatchConfig:
    """The `"optbatch"` section of the DeepSpeed JSON (DESIGN §2)."""

    method: str = _help(f"Selection method: one of {', '.join(METHODS)}.", "optbatch")
    prune_ratio: float = _help("Fraction alpha of every candidate pool that is not trained on, in [0, 1).", 0.3)
    strata: int = _help("K, the number of loss-quantile strata (1 disables stratification).", 3)
    temperature: float = _help("tau of the exp(loss / tau) quota draw; 'inf' gives a flat draw.", 1.0)
    temperature_end: float | None = _help(
        "tau at the last step: 1/tau moves linearly from 1/temperature to 1/temperature_end over training; "
        "negative favours LOW loss (late in training the highest losses are mostly defects); 'inf' = flat; "
        "null = constant temperature.", None)
    quotas: str = _help("'exp_loss' (quotas from an exp(loss/tau) draw) or 'uniform' (ablation).", "exp_loss")
    within: str = _help("'farthest' (farthest-point inside strata) or 'random' (ablation).", "farthest")
    distance: str = _help("Distance in sketch space: 'euclidean' or 'cosine'.", "euclidean")
    feature: str = _help(
        "Per-sample feature: 'grad_curvature' (output-layer gradient / sqrt(Adam v)), 'grad_raw' "
        "(no curvature normalisation, ablation) or 'hidden' (mean lm_head input, ablation).",
        "grad_curvature",
    )
    sketch_dim: int = _help("k, the random-projection dimension of the features (0 = no projection); 512 keeps "
                            "pairwise distances within ~12% (tests/unit/test_scoring.py JL test).", 512)
    eps: float = _help("eps in 1/sqrt(v + eps), the curvature normaliser.", 1e-8)
    vocab_chunk: int = _help("Vocabulary rows processed at once when computing features (bounds memory).", 4096)
    score_batch_size: int = _help("Samples per scoring forward; 0 = 2 x train_micro_batch_size_per_gpu (no "
                                  "activations are kept for backward, so twice the micro batch fits).", 0)
    reweight: str = _help("'none' (the paper's method); 'strata': weight each trained sample by its stratum's "
                          "size / quota (normalised to mean 1), the stratified-sampling estimate of the whole pool's "
                          "loss, so the exp(loss) quotas choose what to look at without shifting the objective; "
                          "'upweight': that weight only where it is above 1 (under-sampled strata), like InfoBatch's "
                          "rescaling of the thinned low-loss samples.", "none")
    outlier_fence: float = _help("k of Tukey's fence Q3 + k IQR over each pool's losses: candidates above it "
                                 "(suspected defects) only fill the budget when the rest cannot; 0 = off.", 0.0)
    seed: int = _help("Seed of the selector and of the sketch projection (same on every rank).", 0)

    def __post_init__(self):
        def bad(key, msg):
            raise ConfigError(f'"optbatch".{key}: {msg}')

        if self.method not in METHODS:
            bad("method", f"'{self.method}' is not a method{_nearest(self.method, METHODS)}")
        if isinstance(self.temperature, str):
            if self.temperature.lower() not in ("inf", "infinity"):
                bad("temperature", f"expected a positive number or 'inf', got '{self.temperature}'")
            self.temperature = math.inf
        if not (0.0 <= float(self.prune_ratio) < 1.0):
            bad("prune_ratio", f"{self.prune_ratio} is outside [0, 1); 0.3 trains on 70% of each pool")
        if self.method == "full" and self.prune_ratio != 0.0:
            self.prune_ratio = 0.0  # full-data training prunes nothing by definition
        if self.method != "full" and self.prune_ratio == 0.0:
            bad("prune_ratio", f"method '{self.method}' with prune_ratio 0 selects everything; use method 'full'")
        if int(self.strata) < 1:
            bad("strata", f"{self.strata} must be >= 1")
        if not (self.temperature > 0):
            bad("temperature", f"{self.temperature} must be > 0")
        if isinstance(self.temperature_end, str):
            if self.temperature_end.lower() not in ("inf", "infinity"):
                bad("temperature_end", f"expected a nonzero number, 'inf' or null, got '{self.temperature_end}'")
            self.temperature_end = math.inf
        if self.temperature_end is not None and not (self.temperature_end == self.temperature_end
                                                     and self.temperature_end != 0):
            bad("temperature_end", f"{self.temperature_end} must be a nonzero number, 'inf' or null")
        for key, allowed in (("quotas", ("exp_loss", "uniform")), ("within", ("farthest", "random")),
                             ("distance", ("euclidean", "cosine")), ("feature", FEATURES),
                             ("reweight", ("none", "strata", "upweight"))):
            value = getattr(self, key)
            if value not in allowed:
                bad(key, f"'{value}' is not allowed{_nearest(str(value), allowed)}")
        if int(self.sketch_dim) < 0:
            bad("sketch_dim", f"{self.sketch_dim} must be >= 0 (0 = use the features unprojected)")
        if not (float(self.outlier_fence) >= 0):
            bad("outlier_fence", f"{self.outlier_fence} must be >= 0 (0 = off, 1.5 = Tukey's usual fence)")
        if not (self.eps > 0):
            bad("eps", f"{self.eps} must be > 0")
        if int(self.vocab_chunk) < 1:
            bad("vocab_chunk", f"{self.vocab_chunk} must be >= 1")
        if int(self.score_batch_size) < 0:
            bad("score_batch_size", f"{self.score_batch_size} must be >= 0")

    @classmethod
    def from_dict(cls, section: dict) -> "OptBatchConfig":
        if not isinstance(section, dict):
            raise ConfigError(f'the "optbatch" section must be a JSON object, got {type(section).__name__}')
        valid = {f.name for f in fields(cls)}
        for key in section:
            if key not in valid:
                raise ConfigError(f'"optbatch" has an unknown key \'{key}\'{_nearest(key, valid)}')
        return cls(**section)

    @property
    def needs_scores(self) -> bool:
        """Whether step 2 (the scoring forward) runs at all: random and full never look at the samples."""
        return self.method not in ("full", "random")

    @property
    def needs_features(self) -> bool:
        return self.method == "optbatch" and self.within == "farthest"

    def selection_config(self):
        from optbatch_ds.selection import SelectionConfig

        return SelectionConfig(method=self.method, strata=self.strata, temperature=self.temperature,
                               temperature_end=self.temperature_end,
                               quotas=self.quotas, within=self.within, distance=self.distance,
                               reweight=self.reweight, outlier_fence=self.outlier_fence, seed=self.seed)


@dataclass
class RunConfig:
    """Everything about a run that is not DeepSpeed's: where data, model and outputs live."""

    deepspeed: str = _help("Path to the DeepSpeed JSON (with an \"optbatch\" section).", "ds_configs/zero3.json")
    model: str | None = _help("HF model id or local directory; default: the built-in small Llama.", None)
    data: str | None = _help("Training data: .json/.jsonl/.parquet file, folder, or datasets name; default: demo.", None)
    eval_data: str | None = _help("Held-out data (same formats); default: the demo eval split, else none.", None)
    data_format: str = _help("auto | alpaca | sharegpt | messages.", "auto")
    output_dir: str = _help("Where checkpoints, metrics, eval and the final HF export go.", "outputs/default")
    epochs: float | None = _help("Passes over the training data (each sample scored once per epoch); "
                                 f"default {DEFAULT_EPOCHS_DEMO} on the demo data, {DEFAULT_EPOCHS} otherwise.", None)
    max_steps: int = _help("Stop after this many optimizer steps (-1: run the epochs).", -1)
    max_seq_len: int = _help("Token limit per sample; longer samples are truncated (and reported).", 256)
    seed: int = _help("Seed of the data order, model init and selection.", 42)
    resume: str | None = _help("'auto' (latest complete checkpoint in output_dir) or a checkpoint path.", None)
    on_bad_record: str = _help("'error' stops at the first bad record; 'skip' counts and reports it.", "error")
    trust_remote_code: bool = _help("Allow model code from the model directory (ChatGLM-style models).", False)
    learning_rate: float | None = _help("Overrides optimizer lr (and 'auto').", None)
    eval_every: int = _help("Evaluate every N steps (0: only at the end).", 0)
    save_every: int = _help("Checkpoint every N steps (0: only at the end).", 0)
    eval_max_new_tokens: int = _help("Greedy decoding length for exact match / BLEU / ROUGE.", 32)
    eval_samples_per_task: int = _help("Cap on held-out samples per task for generation metrics (0: all).", 0)
    collective_timeout: float = _help("Seconds before a collective that hangs (dead rank) becomes an error.", 600.0)
    log_every: int = _help("Write a progress line every N steps (0: only the progress bar).", 10)
    export: bool = _help("Write the Hugging Face export to output_dir/final at the end.", True)
    method: str | None = _help("Overrides \"optbatch\".method.", None)
    prune_ratio: float | None = _help("Overrides \"optbatch\".prune_ratio.", None)


# ---------------------------------------------------------------------------- command line

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage and exits 2; keep that, but add the nearest flag
        raise ConfigError(message)


def build_arg_parser() -> argparse.ArgumentParser:
    p = _Parser(description="Instruction-tune a causal LM with DeepSpeed and OptBatch selection.",
                allow_abbrev=False)
    for f in fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"help": f.metadata["help"], "default": None, "dest": f.name}
        if f.type in ("bool", bool):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
            if f.name in ("method", "prune_ratio"):
                kw["type"] = float if f.name == "prune_ratio" else str
        p.add_argument(flag, **kw)
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, dest="local_rank",
                   help="Set by the deepspeed launcher; ignored otherwise.")
    return p


def parse_args(argv=None) -> RunConfig:
    parser = build_arg_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flags = [a for a in parser._option_string_actions]
        first = unknown[0].split("=")[0]
        raise ConfigError(f"unknown flag '{first}'{_nearest(first, flags)}")
    values = {k: v for k, v in vars(args).items() if v is not None and k != "local_rank"}
    cfg = RunConfig(**values)
    if cfg.on_bad_record not in ("error", "skip"):
        raise ConfigError(f"--on-bad-record must be 'error' or 'skip', got '{cfg.on_bad_record}'")
    if cfg.resume is not None and cfg.resume != "auto" and not os.path.exists(cfg.resume):
        raise ConfigError(f"--resume {cfg.resume}: no such checkpoint (use 'auto' or a checkpoints/step_XXXXXX path)")
    if cfg.max_seq_len < 8:
        raise ConfigError(f"--max-seq-len {cfg.max_seq_len} is too small (at least 8)")
    if cfg.epochs is not None and cfg.epochs <= 0 and cfg.max_steps <= 0:
        raise ConfigError("--epochs must be > 0 (or give --max-steps)")
    return cfg


# ---------------------------------------------------------------------------- DeepSpeed JSON

@dataclass
class Resolved:
    """The resolved run: DeepSpeed's dict (no "auto" left), the OptBatch section, and the derived sizes."""

    run: RunConfig
    ds: dict
    optbatch: OptBatchConfig
    world_size: int
    train_batch_size: int          # b: samples per optimizer step, all ranks together
    micro_batch_size: int
    grad_accum: int
    candidates: int                # c: samples scored per step, all ranks together

    @property
    def candidates_per_rank(self) -> int:
        return self.candidates // self.world_size

    @property
    def batch_per_rank(self) -> int:
        return self.train_batch_size // self.world_size

    def to_json(self) -> dict:
        return {"run": dataclasses.asdict(self.run), "deepspeed": self.ds,
                "optbatch": dataclasses.asdict(self.optbatch),
                "derived": {"world_size": self.world_size, "train_batch_size": self.train_batch_size,
                            "micro_batch_size": self.micro_batch_size, "gradient_accumulation_steps": self.grad_accum,
                            "candidates": self.candidates}}


def load_json_config(path: str) -> dict:
    if not os.path.exists(path):
        raise ConfigError(f"--deepspeed {path}: file not found (try ds_configs/zero3.json)")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from None


def num_candidates(train_batch_size: int, prune_ratio: float, world_size: int) -> int:
    """c = ceil(b / (1 - alpha)), rounded up so every rank scores the same number."""
    c = math.ceil(train_batch_size / (1.0 - prune_ratio) - 1e-9)
    return int(math.ceil(c / world_size) * world_size)


def _is_auto(v) -> bool:
    return isinstance(v, str) and v.lower() == "auto"


def resolve(run: RunConfig, world_size: int, accelerator: str = "cpu", bf16_supported: bool = False,
            raw: dict | None = None, num_train_samples: int | None = None) -> Resolved:
    """Fill "auto" values, apply flag overrides, check the batch arithmetic. Raises ConfigError."""
    ds = copy.deepcopy(raw if raw is not None else load_json_config(run.deepspeed))
    if not isinstance(ds, dict):
        raise ConfigError(f"{run.deepspeed}: the top level must be a JSON object")
    for key in [k for k in ds if isinstance(k, str) and k.startswith("_")]:
        del ds[key]  # "_comment" and friends: notes for people, not for DeepSpeed
    section = dict(ds.pop("optbatch", {}) or {})
    if run.method is not None:
        section["method"] = run.method
    if run.prune_ratio is not None:
        section["prune_ratio"] = run.prune_ratio
    if section.get("method") == "full" and run.prune_ratio is None:
        section["prune_ratio"] = 0.0
    ob = OptBatchConfig.from_dict(section)

    micro = ds.get("train_micro_batch_size_per_gpu", "auto")
    accum = ds.get("gradient_accumulation_steps", "auto")
    total = ds.get("train_batch_size", "auto")
    for key, v in (("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", accum),
                   ("train_batch_size", total)):
        if not _is_auto(v) and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ConfigError(f"{run.deepspeed}: {key} must be a positive integer or \"auto\", got {v!r}")
    if _is_auto(micro) and _is_auto(accum) and _is_auto(total):
        micro, accum = 4, 1
    if _is_auto(total):
        micro = 4 if _is_auto(micro) else micro
        accum = 1 if _is_auto(accum) else accum
        total = micro * accum * world_size
    elif _is_auto(micro) or _is_auto(accum):
        if _is_auto(micro) and _is_auto(accum):
            accum = 1
        known = accum if _is_auto(micro) else micro
        per = total / (known * world_size)
        if per != int(per):
            raise ConfigError(
                f"{run.deepspeed}: train_batch_size {total} is not divisible by "
                f"{'gradient_accumulation_steps' if _is_auto(micro) else 'train_micro_batch_size_per_gpu'} "
                f"{known} x world size {world_size}; set train_batch_size to a multiple of {known * world_size}")
        if _is_auto(micro):
            micro = int(per)
        else:
            accum = int(per)
    if total != micro * accum * world_size:
        raise ConfigError(
            f"{run.deepspeed}: train_batch_size {total} != train_micro_batch_size_per_gpu {micro} x "
            f"gradient_accumulation_steps {accum} x world size {world_size} (= {micro * accum * world_size}); "
            f"set train_batch_size to {micro * accum * world_size} or \"auto\"")
    ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"] = total, micro, accum

    # Precision: "auto" means bf16 where the hardware has it, fp32 elsewhere (CPU).
    for key in ("bf16", "fp16"):
        sec = ds.get(key)
        if isinstance(sec, dict) and _is_auto(sec.get("enabled")):
            sec["enabled"] = bool(key == "bf16" and bf16_supported and accelerator != "cpu")
    if ds.get("bf16", {}).get("enabled") and ds.get("fp16", {}).get("enabled"):
        raise ConfigError(f"{run.deepspeed}: bf16 and fp16 are both enabled; enable one")

    opt = ds.get("optimizer")
    lr = run.learning_rate
    if isinstance(opt, dict):
        params = opt.setdefault("params", {})
        if lr is not None:
            params["lr"] = lr
        elif _is_auto(params.get("lr", "auto")):
            # The built-in small model learns fast at 1e-3; pretrained models want fine-tuning rates.
            params["lr"] = DEFAULT_LR_SMALL_MODEL if run.model is None else DEFAULT_LR_PRETRAINED
        lr = params["lr"]
        for k, v in list(params.items()):
            if _is_auto(v):
                raise ConfigError(f'{run.deepspeed}: optimizer.params.{k} is "auto", which only lr accepts')

    c = num_candidates(total, ob.prune_ratio, world_size)
    if ob.method == "optbatch" and ob.strata > c:
        raise ConfigError(f'"optbatch".strata {ob.strata} is more than the {c} candidates per step; '
                          f"use strata <= {c} or raise train_batch_size")
    if ob.method == "ccs" and ob.strata > total:
        raise ConfigError(f'"optbatch".strata {ob.strata} is more than the train_batch_size {total}')

    sched = ds.get("scheduler")
    if isinstance(sched, dict):
        sp = sched.setdefault("params", {})
        total_steps = planned_steps(run, num_train_samples, c)
        for k, v in list(sp.items()):
            if not _is_auto(v):
                continue
            if k == "total_num_steps":
                sp[k] = max(total_steps, 1)
            elif k == "warmup_num_steps":
                sp[k] = max(1, int(0.05 * total_steps)) if total_steps else 10
            elif k == "warmup_max_lr":
                sp[k] = lr if lr is not None else DEFAULT_LR_PRETRAINED
            elif k == "warmup_min_lr":
                sp[k] = 0.0
            else:
                raise ConfigError(f'{run.deepspeed}: scheduler.params.{k} is "auto", which is not resolvable')
    # The HF export gathers ZeRO-3 shards into one 16-bit state dict.
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage", 0) == 3:
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    ds.setdefault("steps_per_print", 10**9)  # our own progress line replaces DeepSpeed's
    return Resolved(run=run, ds=ds, optbatch=ob, world_size=world_size, train_batch_size=total,
                    micro_batch_size=micro, grad_accum=accum, candidates=c)


def planned_steps(run: RunConfig, num_train_samples: int | None, candidates: int) -> int:
    """Optimizer steps of the run: --max-steps when given, else epochs x full pools per epoch.

    The sampler hands out whole pools of c candidates; the last partial pool of an epoch is dropped
    (every epoch is a fresh permutation, so a different few samples sit out each time)."""
    if run.max_steps and run.max_steps > 0:
        return run.max_steps
    if not num_train_samples:
        return 0
    epochs = run.epochs if run.epochs is not None else (DEFAULT_EPOCHS_DEMO if run.data is None else DEFAULT_EPOCHS)
    per_epoch = num_train_samples // candidates
    if per_epoch == 0:
        raise ConfigError(f"the training set has {num_train_samples} samples, fewer than the {candidates} "
                          f"candidates of one step; lower train_batch_size or add data")
    return int(math.ceil(per_epoch * epochs))
