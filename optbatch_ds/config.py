"""Typed configuration: command line < DeepSpeed JSON ("optbatch" section) < flag overrides.

One JSON describes the whole run: DeepSpeed's own keys, plus an `"optbatch"` section that DeepSpeed
never sees (it is popped here). Each key is declared once, as a dataclass field with its default,
help text and allowed values (`optbatch_ds.options.option`): the selection keys in
`selection.SelectionConfig`, the scoring keys in `scoring.ScoringConfig`, the run's own flags in
`RunConfig`. Unknown keys and flags are errors raised before any training starts, with the nearest
valid name in the message.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, fields
from typing import Any

from optbatch_ds.data.errors import ON_BAD_RECORD
from optbatch_ds.data.formats import formats_help
from optbatch_ds.data.templates import check_choice as check_chat_template
from optbatch_ds.ds_json import (add_missing_sections, check_no_auto_left, check_precision, fill_hf_autos, is_auto,
                                 model_hidden_size, needs_hidden_size)
from optbatch_ds.errors import ConfigError, nearest_name
from optbatch_ds.modeling import is_untrained
from optbatch_ds.options import as_float, bad, option
from optbatch_ds.run_options import ModelOptions, OutputOptions
from optbatch_ds.scoring.config import FEATURES, ScoringConfig
from optbatch_ds.selection.config import METHODS, SelectionConfig
from optbatch_ds.signals import SignalConfig

__all__ = ["BatchSizes", "ConfigError", "FEATURES", "METHODS", "OptBatchConfig", "Resolved", "RunConfig", "build_arg_parser",
           "load_json_config", "num_candidates", "parse_args", "planned_steps", "resolve"]

DEFAULT_EPOCHS_DEMO = 8  # the built-in model needs several passes over the toy set to show learning
DEFAULT_EPOCHS = 3
DEFAULT_LR_SMALL_MODEL = 1e-3
DEFAULT_LR_PRETRAINED = 2e-5
DATA_FORMATS = ("auto", "alpaca", "sharegpt", "messages")
# What the baselines (random, online_hard, ccs, infobatch) rank and score by unless the section names it: the
# loss, measured by a scoring forward each step, as they were published and as BENCHMARKS.md ran them.
BASELINE = dict(signal="loss", scoring="fresh")
# Named settings of the "optbatch" section; keys given next to "preset" override the preset's.
PRESETS = {
    # the package's defaults (the declarations): the best setting without a reference model (BENCHMARKS.md)
    "default": {},
    # fine-tuning a pretrained model (the default when train.py gets --model): per-task loss truncation, top-k,
    # stale scoring, no forward for a candidate never measured (BENCHMARKS.md §7)
    "finetune": dict(signal="truncation", strata=1, within="top", scoring="stale", prior="mean"),
    # with launch/reference.py's reference losses, the best setting of all: plain top-k by reducible loss, no
    # forward for a candidate never measured (its task's mean loss, and kept before any measured one, so every
    # record is trained once; from prune ratio FRESH_PRIOR_FROM_RATIO a scoring forward instead: BENCHMARKS.md §3b)
    "reference": dict(signal="reducible", strata=1, within="top", scoring="stale", prior="train"),
    # OptBatch as published
    "paper": dict(method="optbatch", signal="loss", scoring="fresh", prior="fresh", refresh=0.0, strata=3,
                  strata_by="signal", temperature=1.0, temperature_end=None, quotas="exp_loss", within="farthest",
                  distance="euclidean", feature="grad_curvature", reweight="none", outlier_fence=0.0),
}


# From this prune ratio on, the reference preset scores never-measured candidates with a forward (prior fresh):
# at 0.5 training each record once (prior train) costs more than the forward, and prior mean leaves 40% of one
# task's right answers never trained (BENCHMARKS.md §3b).
FRESH_PRIOR_FROM_RATIO = 0.5


def _deep_cut(ratio) -> bool:
    """Whether `prune_ratio` (as written; a malformed one is left to the config's own check) is a deep cut."""
    try:
        return float(ratio) >= FRESH_PRIOR_FROM_RATIO
    except (TypeError, ValueError):
        return False


@dataclass(frozen=True)
class OptBatchConfig(SignalConfig, ScoringConfig, SelectionConfig):
    """The `"optbatch"` section of the DeepSpeed JSON (DESIGN §2): the selection keys (declared and checked
    by `SelectionConfig`), the scoring keys (`ScoringConfig`), the signal keys (`signals.SignalConfig`) and
    the prune ratio α. Flat, as in the JSON: `OptBatchConfig(method="optbatch", prune_ratio=0.3, strata=3)`."""

    prune_ratio: float = option(0.3, "alpha: fraction of each candidate pool not trained on, in [0, 1); c = "
                                "ceil(b / (1 - alpha)) candidates per step, b = train_batch_size.")
    preset: str = option("default", "Named settings the other keys start from: finetune (the default for a "
                         "pretrained --model: top-k by the truncation signal, stale scoring, prior mean), default "
                         "(the default for the built-in model trained from scratch: signal neighbours, stale scoring, "
                         "strata on loss, top within), reference (the default when reference_losses is given: top-k "
                         "by reducible loss, stale scoring, prior train; prior fresh from prune_ratio 0.5), paper "
                         "(OptBatch as published: loss signal, fresh scoring, exp(loss) quotas, farthest-point). Keys "
                         "beside it override it.",
                         choices=tuple(PRESETS))

    def __post_init__(self):
        SelectionConfig.__post_init__(self)
        ScoringConfig.__post_init__(self)
        SignalConfig.__post_init__(self)
        ratio = as_float(self.prune_ratio, "prune_ratio", allow_inf=False)
        if not 0.0 <= ratio < 1.0:
            raise bad("prune_ratio", f"{self.prune_ratio} is outside [0, 1); 0.3 trains on 70% of each pool")
        if self.method == "full":
            ratio = 0.0  # full-data training prunes nothing by definition
        elif ratio == 0.0:
            raise bad("prune_ratio", f"method '{self.method}' with prune_ratio 0 selects everything; use method 'full'")
        object.__setattr__(self, "prune_ratio", ratio)

    @classmethod
    def from_dict(cls, section: dict, pretrained: bool = False) -> "OptBatchConfig":
        """The JSON section as written; unknown keys are a ConfigError naming the nearest known one.

        Without a "preset" key the preset is chosen by what is trained (BENCHMARKS.md): "reference" when
        `reference_losses` is given (with prior "fresh" from prune_ratio FRESH_PRIOR_FROM_RATIO on, unless the
        section names a prior), else "finetune" when `pretrained` (a user's model: launch/train.py --model,
        the Trainer integration), else "default" (the built-in model, trained from scratch). The baselines
        (method other than optbatch) start from their published settings instead unless a preset is named.
        Keys starting with "_" are notes for people ("_comment"), as in the rest of the DeepSpeed JSON.
        """
        if not isinstance(section, dict):
            raise ConfigError(f'the "optbatch" section must be a JSON object, got {type(section).__name__}')
        section = {k: v for k, v in section.items() if not (isinstance(k, str) and k.startswith("_"))}
        valid = [f.name for f in fields(cls)]
        for key in section:
            if key not in valid:
                raise ConfigError(f'"optbatch" has an unknown key \'{key}\'{nearest_name(key, valid)}')
        # reference losses given and no preset named: use them the way that works best
        preset = section.get("preset", "reference" if section.get("reference_losses") else
                             "finetune" if pretrained else "default")
        if preset not in PRESETS:
            raise ConfigError(f'"optbatch".preset: \'{preset}\' is not one of {", ".join(PRESETS)}'
                              f"{nearest_name(preset, PRESETS)}")
        start = PRESETS[preset]
        if section.get("method", start.get("method", "optbatch")) != "optbatch" and "preset" not in section:
            start = dict(BASELINE)  # the baselines as published, unless a key beside them says otherwise
        keys = {**start, **section, "preset": preset}  # config.json names the preset that was used
        if keys.get("scoring", "stale") != "stale" and "prior" not in section:
            keys.pop("prior", None)  # a preset's prior means nothing once the section asks for fresh scoring
        elif preset == "reference" and "prior" not in section and _deep_cut(keys.get("prune_ratio", cls.prune_ratio)):
            keys["prior"] = "fresh"  # a deep cut starves what the prior ranks low unless it is measured once (§3b)
        return cls(**keys)

    @property
    def needs_scores(self) -> bool:
        """Whether step 2 (scoring) runs at all: random and full never look at the samples."""
        return self.method not in ("full", "random")

    @property
    def stale(self) -> bool:
        """Whether the selector uses recorded values (scoring stale) instead of a scoring forward per step."""
        return self.needs_scores and self.scoring == "stale"

    @property
    def needs_features(self) -> bool:
        """Whether step 2 computes sketches: for farthest-point filling, and for the neighbours signal."""
        return self.needs_scores and ((self.method == "optbatch" and self.within == "farthest")
                                      or self.signal == "neighbours")

    def selection_config(self) -> SelectionConfig:
        """The selection keys alone, for `Selector` / `select`."""
        return SelectionConfig(**{f.name: getattr(self, f.name) for f in fields(SelectionConfig)})


@dataclass
class RunConfig(OutputOptions, ModelOptions):
    """Everything about a run that is not DeepSpeed's: where data, model and outputs live, how the model is fitted
    (`run_options.ModelOptions`) and what the run keeps (`run_options.OutputOptions`). Checked on creation."""

    deepspeed: str = option("ds_configs/zero3.json", "Path to the DeepSpeed JSON (with an \"optbatch\" section).")
    model: str | None = option(None, "HF model id or local directory; default: the built-in small Llama.")
    data: str | None = option(None, "Training data: .json/.jsonl/.parquet file, folder, or datasets name; default: demo.")
    eval_data: str | None = option(None, "Held-out data (same formats); default: the demo eval split, else none.")
    data_format: str = option("auto", "auto | alpaca | sharegpt | messages.", choices=DATA_FORMATS, what="data format")
    chat_template: str = option("tokenizer", "Chat template to train with: tokenizer (the model's own, the built-in "
                                "one if it has none), builtin, chatml, or a Jinja file PATH.jinja; saved with the "
                                "export in final/.")
    output_dir: str = option("outputs/default", "Where checkpoints, metrics, eval and the final HF export go.")
    epochs: float | None = option(None, "Passes over the training data (each sample scored once per epoch); "
                                  f"default {DEFAULT_EPOCHS_DEMO} on the demo data, {DEFAULT_EPOCHS} otherwise.")
    max_steps: int = option(-1, "Stop after this many optimizer steps (-1: run the epochs).")
    max_seq_len: int = option(256, "Token limit per sample; longer samples are truncated (and reported).")
    dataset_num_proc: int | None = option(None, "Processes that tokenize the data (datasets.map num_proc) on the "
                                          "first start; later starts read the cached Arrow file. Default: one.")
    seed: int = option(42, "Seed of the data order, model init and selection.")
    resume: str | None = option(None, "'auto' (latest complete checkpoint in output_dir) or a checkpoint path.")
    on_bad_record: str = option("error", "'error' stops at the first bad record; 'skip' counts and reports it.",
                                choices=ON_BAD_RECORD)
    trust_remote_code: bool = option(False, "Allow model code from the model directory (ChatGLM-style models).")
    learning_rate: float | None = option(None, "Overrides optimizer lr (and 'auto').")
    eval_every: int = option(0, "Evaluate every N steps (0: only at the end).")
    save_every: int = option(0, "Checkpoint every N steps (0: only at the end).")
    eval_max_new_tokens: int = option(32, "Greedy decoding length for exact match / BLEU / ROUGE.")
    eval_samples_per_task: int = option(0, "Cap on held-out samples per task for generation metrics (0: all).")
    collective_timeout: float = option(600.0, "Seconds before a collective that hangs (dead rank) becomes an error.")
    log_every: int = option(10, "Write a progress line every N steps (0: only the progress bar).")
    group_by_length: bool = option(True, "Deal each step's selected samples to ranks and micro-batches by length, so "
                                   "little compute goes to padding (the step's samples, weights and gradient stay "
                                   "the same; unlike transformers' flag it never moves a sample to another step).")
    method: str | None = option(None, "Overrides \"optbatch\".method: " + " | ".join(METHODS) + ".")
    prune_ratio: float | None = option(None, "Overrides \"optbatch\".prune_ratio.")
    reference_losses: str | None = option(None, "Overrides \"optbatch\".reference_losses (launch/reference.py's "
                                          "output folder).")

    def __post_init__(self):
        for f in fields(self):
            allowed = f.metadata.get("choices")
            value = getattr(self, f.name)
            if allowed and value not in allowed:
                raise ConfigError(f"unknown {f.metadata['what']} '{value}' (--{f.name.replace('_', '-')}); choose one "
                                  f"of {', '.join(allowed)}{nearest_name(value, allowed)}")
        check_chat_template(self.chat_template)
        if self.resume is not None and self.resume != "auto" and not os.path.exists(self.resume):
            raise ConfigError(f"--resume {self.resume}: no such checkpoint (use 'auto' or a checkpoints/step_XXXXXX path)")
        if self.max_seq_len < 8:
            raise ConfigError(f"--max-seq-len {self.max_seq_len} is too small (at least 8)")
        if self.epochs is not None and self.epochs <= 0 and self.max_steps <= 0:
            raise ConfigError("--epochs must be > 0 (or give --max-steps)")
        self.check_model_options()
        self.check_output_options()


# ---------------------------------------------------------------------------- command line

class Parser(argparse.ArgumentParser):
    """argparse, with its errors raised as ConfigError (one `error:` line and exit 2 through cli.run_main)."""

    def error(self, message):
        raise ConfigError(message)


def _flag_type(f: dataclasses.Field):
    """int / float / str from a field's annotation ('float | None' -> float)."""
    return {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)


def _default_note(f: dataclasses.Field) -> str:
    """" Default: X." for --help when the field has a plain default its help text does not state already."""
    value = f.default
    if value is None or value is dataclasses.MISSING or isinstance(value, bool) or "default" in f.metadata["help"]:
        return ""
    return f" Default: {' '.join(map(str, value)) if isinstance(value, tuple) else value}."


def _flag_kwargs(f: dataclasses.Field) -> dict[str, Any]:
    """argparse keywords of a field: --flag / --no-flag for booleans, several words for tuples, `choices` for
    keys with a "none" value whose --no-flag spelling sets it (--no-export = --export none)."""
    kw: dict[str, Any] = {"help": f.metadata["help"] + _default_note(f), "default": None, "dest": f.name}
    kind = str(f.type).split(" ")[0]
    if kind in ("bool", "<class 'bool'>"):
        kw["action"] = argparse.BooleanOptionalAction
    elif kind.startswith("tuple["):
        kw["nargs"] = "+"
    else:
        kw["type"] = _flag_type(f)
    return kw


def build_arg_parser(description: str = "Instruction-tune a causal LM with DeepSpeed and OptBatch selection.",
                     names: tuple[str, ...] | None = None, prog: str | None = None) -> argparse.ArgumentParser:
    """A parser with one flag per RunConfig field (or the fields in `names`), generated from their metadata:
    --max-seq-len for max_seq_len, --flag / --no-flag for booleans, --flag a b for tuples, and --no-flag for
    a choice that includes "none". Defaults are None: a flag not given keeps the dataclass default. RunConfig's
    own flags are listed first, then the model and output groups it inherits."""
    p = Parser(description=description, allow_abbrev=False, prog=prog, epilog=formats_help(),
               formatter_class=argparse.RawDescriptionHelpFormatter)
    own = RunConfig.__dataclass_fields__.keys() - ModelOptions.__dataclass_fields__.keys() \
        - OutputOptions.__dataclass_fields__.keys()
    for f in sorted(fields(RunConfig), key=lambda f: f.name not in own):
        if names is not None and f.name not in names:
            continue
        flag = "--" + f.name.replace("_", "-")
        p.add_argument(flag, **_flag_kwargs(f))
        if "none" in (f.metadata.get("choices") or ()) and f.type not in ("bool", bool):
            p.add_argument("--no-" + flag[2:], action="store_const", const="none", dest=f.name,
                           help=f"Same as {flag} none.")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, dest="local_rank",
                   help="Set by the deepspeed launcher; ignored otherwise.")
    return p


def parse_known(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """parser.parse_args, with an unknown flag reported as a ConfigError naming the nearest known one."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        first = unknown[0].split("=")[0]
        raise ConfigError(f"unknown flag '{first}'{nearest_name(first, parser._option_string_actions)}")
    return args


def parse_args(argv=None) -> RunConfig:
    """launch/train.py's command line as a (checked) RunConfig."""
    args = parse_known(build_arg_parser(), argv)
    return RunConfig(**{k: v for k, v in vars(args).items() if v is not None and k != "local_rank"})


# ---------------------------------------------------------------------------- DeepSpeed JSON

@dataclass(frozen=True)
class BatchSizes:
    """The sizes of one OptBatch step (DESIGN §2), all ranks together unless named per rank."""

    candidates: int        # c: samples scored per step
    train_batch_size: int  # b: samples per optimizer step
    micro_batch_size: int  # per rank and forward
    grad_accum: int        # micro-batches per optimizer step
    world: int

    @property
    def candidates_per_rank(self) -> int:
        return self.candidates // self.world

    @property
    def batch_per_rank(self) -> int:
        return self.train_batch_size // self.world


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
    num_train_samples: int | None = None  # the usable training samples, once the data is loaded
    sections_added: tuple[str, ...] = ()  # "optimizer" / "scheduler" sections the JSON lacked (HF's defaults)

    @property
    def candidates_per_rank(self) -> int:
        return self.candidates // self.world_size

    @property
    def batch_per_rank(self) -> int:
        return self.train_batch_size // self.world_size

    @property
    def sizes(self) -> BatchSizes:
        return BatchSizes(self.candidates, self.train_batch_size, self.micro_batch_size, self.grad_accum,
                          self.world_size)

    @property
    def zero_stage(self) -> int:
        return int(self.ds.get("zero_optimization", {}).get("stage", 0))

    def to_json(self) -> dict:
        derived = {"world_size": self.world_size, "train_batch_size": self.train_batch_size,
                   "micro_batch_size": self.micro_batch_size, "gradient_accumulation_steps": self.grad_accum,
                   "candidates": self.candidates}
        if self.num_train_samples is not None:
            derived["num_train_samples"] = self.num_train_samples
        if self.sections_added:
            derived["sections_added"] = list(self.sections_added)
        return {"run": dataclasses.asdict(self.run), "deepspeed": self.ds, "optbatch": dataclasses.asdict(self.optbatch),
                "derived": derived}


def load_json_config(path: str) -> dict:
    """The DeepSpeed JSON as a dict; ConfigError naming the file (and line) when missing or broken."""
    if not os.path.exists(path):
        raise ConfigError(f"--deepspeed {path}: file not found (try ds_configs/zero3.json)")
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is dropped
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from None


def num_candidates(train_batch_size: int, prune_ratio: float, world_size: int) -> int:
    """c = ceil(b / (1 - alpha)), rounded up so every rank scores the same number."""
    c = math.ceil(train_batch_size / (1.0 - prune_ratio) - 1e-9)
    return int(math.ceil(c / world_size) * world_size)


_is_auto = is_auto


def _optbatch_section(run: RunConfig, ds: dict) -> OptBatchConfig:
    """The "optbatch" section, popped from `ds`, with the --method / --prune-ratio overrides applied."""
    section = dict(ds.pop("optbatch", {}) or {})
    if run.method is not None:
        section["method"] = run.method
    if run.prune_ratio is not None:
        section["prune_ratio"] = run.prune_ratio
    if run.reference_losses is not None:
        section["reference_losses"] = run.reference_losses
    if section.get("method") == "full" and run.prune_ratio is None:
        section["prune_ratio"] = 0.0
    # a user's --model is pretrained; the built-in model's own directory (as tests and demos pass it) is not
    return OptBatchConfig.from_dict(section, pretrained=run.model is not None and not is_untrained(run.model))


def _batch_sizes(path: str, ds: dict, world_size: int) -> tuple[int, int, int]:
    """(train_batch_size, micro, accumulation) with DeepSpeed's "auto" filled in and the arithmetic checked."""
    micro = ds.get("train_micro_batch_size_per_gpu", "auto")
    accum = ds.get("gradient_accumulation_steps", "auto")
    total = ds.get("train_batch_size", "auto")
    for key, v in (("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", accum),
                   ("train_batch_size", total)):
        if not _is_auto(v) and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ConfigError(f"{path}: {key} must be a positive integer or \"auto\", got {v!r}")
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
                f"{path}: train_batch_size {total} is not divisible by "
                f"{'gradient_accumulation_steps' if _is_auto(micro) else 'train_micro_batch_size_per_gpu'} "
                f"{known} x world size {world_size}; set train_batch_size to a multiple of {known * world_size}")
        if _is_auto(micro):
            micro = int(per)
        else:
            accum = int(per)
    if total != micro * accum * world_size:
        raise ConfigError(
            f"{path}: train_batch_size {total} != train_micro_batch_size_per_gpu {micro} x "
            f"gradient_accumulation_steps {accum} x world size {world_size} (= {micro * accum * world_size}); "
            f"set train_batch_size to {micro * accum * world_size} or \"auto\"")
    return total, micro, accum


def _precision(path: str, ds: dict, accelerator: str, bf16_supported: bool, fp16_supported: bool) -> None:
    """"auto" precision means bf16 where the hardware has it, fp32 elsewhere (CPU); then what is enabled must
    exist on this machine (`ds_json.check_precision`)."""
    for key in ("bf16", "fp16"):
        sec = ds.get(key)
        if sec is not None and not isinstance(sec, dict):
            raise ConfigError(f'{path}: "{key}" must be a JSON object like {{"enabled": "auto"}}, got {sec!r}')
        if isinstance(sec, dict) and _is_auto(sec.get("enabled")):
            sec["enabled"] = bool(key == "bf16" and bf16_supported and accelerator != "cpu")
    check_precision(path, ds, accelerator, bf16_supported, fp16_supported)


def _learning_rate(run: RunConfig, ds: dict) -> float | None:
    """Fill the optimizer's "auto" lr (--learning-rate wins); returns the lr, None without an optimizer."""
    opt = ds.get("optimizer")
    if not isinstance(opt, dict):
        return run.learning_rate
    params = opt.setdefault("params", {})
    if run.learning_rate is not None:
        params["lr"] = run.learning_rate
    elif _is_auto(params.get("lr", "auto")):
        # The built-in small model learns fast at 1e-3; pretrained models want fine-tuning rates.
        params["lr"] = DEFAULT_LR_SMALL_MODEL if run.model is None else DEFAULT_LR_PRETRAINED
    for k, v in list(params.items()):
        if _is_auto(v):
            raise ConfigError(f'{run.deepspeed}: optimizer.params.{k} is "auto", which only lr accepts')
    return params["lr"]


def _scheduler(path: str, ds: dict, total_steps: int, lr: float | None) -> None:
    """Fill the scheduler's "auto" params from the planned steps (5% warm-up) and the learning rate."""
    sched = ds.get("scheduler")
    if not isinstance(sched, dict):
        return
    sp = sched.setdefault("params", {})
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
            raise ConfigError(f'{path}: scheduler.params.{k} is "auto", which is not resolvable')


def resolve(run: RunConfig, world_size: int, accelerator: str = "cpu", bf16_supported: bool = False,
            raw: dict | None = None, num_train_samples: int | None = None,
            fp16_supported: bool | None = None) -> Resolved:
    """Fill "auto" values (every one Hugging Face's DeepSpeed integration fills, `ds_json.AUTO_VALUES`), give a
    JSON without an optimizer or scheduler Hugging Face's defaults, apply flag overrides, check the batch
    arithmetic and that the machine has the precision asked for. Raises ConfigError; reads no data or weights.

    raw: the DeepSpeed dict (default: read from run.deepspeed); num_train_samples: the usable training
    samples, which the scheduler's "auto" step counts need (None: not known yet; a cheap early check);
    fp16_supported: the accelerator's answer (default: not on CPU)."""
    ds = copy.deepcopy(raw if raw is not None else load_json_config(run.deepspeed))
    if not isinstance(ds, dict):
        raise ConfigError(f"{run.deepspeed}: the top level must be a JSON object")
    for key in [k for k in ds if isinstance(k, str) and k.startswith("_")]:
        del ds[key]  # "_comment" and friends: notes for people, not for DeepSpeed
    ob = _optbatch_section(run, ds)
    added = add_missing_sections(ds)
    total, micro, accum = _batch_sizes(run.deepspeed, ds, world_size)
    ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"] = total, micro, accum
    _precision(run.deepspeed, ds, accelerator, bf16_supported,
               accelerator != "cpu" if fp16_supported is None else fp16_supported)
    hidden = model_hidden_size(run.model, run.trust_remote_code) if needs_hidden_size(ds) else None
    fill_hf_autos(run.deepspeed, ds, hidden)
    lr = _learning_rate(run, ds)
    c = num_candidates(total, ob.prune_ratio, world_size)
    if ob.method == "optbatch" and ob.strata > c:
        raise ConfigError(f'"optbatch".strata {ob.strata} is more than the {c} candidates per step; '
                          f"use strata <= {c} or raise train_batch_size")
    if ob.method == "ccs" and ob.strata > total:
        raise ConfigError(f'"optbatch".strata {ob.strata} is more than the train_batch_size {total}')
    _scheduler(run.deepspeed, ds, planned_steps(run, num_train_samples, c), lr)
    # The HF export gathers ZeRO-3 shards into one 16-bit state dict.
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage", 0) == 3:
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    ds.setdefault("steps_per_print", 10**9)  # our own progress line replaces DeepSpeed's
    check_no_auto_left(run.deepspeed, ds)
    return Resolved(run=run, ds=ds, optbatch=ob, world_size=world_size, train_batch_size=total,
                    micro_batch_size=micro, grad_accum=accum, candidates=c, num_train_samples=num_train_samples,
                    sections_added=tuple(added))


def optbatch_table() -> str:
    """The README's table of the "optbatch" keys, from their declarations (run `python -m optbatch_ds.config`)."""
    from optbatch_ds.options import markdown_table

    return markdown_table(OptBatchConfig, first=("method", "prune_ratio"))


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


if __name__ == "__main__":  # print the README's "optbatch" table
    print(optbatch_table())
