"""Set-up shared by the entry points that train or score with DeepSpeed (launch/train.py, offline pruning):
seeds, data, tokenizer and model, the resolved config, the engine. Collective where it says so.

    seed_everything(run.seed)
    prep = prepare_data_and_model(run, local_rank, out)          # local rank 0 of each node builds, others read
    rs = resolve_here(run, world, num_train_samples=len(prep.pool))
    engine, n_params, keep_alive, info = build_engine(prep, rs)      # info: attention, checkpointing, LoRA
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from optbatch_ds import comm
from optbatch_ds.config import Resolved, RunConfig, resolve
from optbatch_ds.data import DataError, SkipReport, load_examples
from optbatch_ds.data.cache import EncodedTable, encode_cached
from optbatch_ds.data.demo import make_demo_data
from optbatch_ds.adapters import wrap_lora
from optbatch_ds.modeling import (attention_in_use, build_default_model, cache_root, check_vocab,
                                  enable_gradient_checkpointing, load_model, load_tokenizer)


@dataclass
class Prepared:
    """The run's data, tokenized, and where its model lives (identical on every rank)."""

    examples: list            # training Examples, in file order
    eval_examples: list       # held-out Examples ([] without held-out data)
    encoded: EncodedTable     # Encoded per training Example (None = skipped), Arrow-backed (data.cache)
    eval_encoded: EncodedTable | list
    pool: list[int]           # indices into `encoded` of the usable training samples: the sampler's range
    tokenizer: object
    model_path: str
    report: SkipReport        # skipped records and truncation counts
    train_spec: str           # the training data as given (the demo file without --data)
    eval_spec: str | None


def seed_everything(seed: int) -> None:
    """Python, numpy and torch RNGs (model init, and anything else that draws) from the run's seed."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def demo_data(output_dir: str) -> dict:
    """The demo set's {train, eval, reference} paths for a run writing to `output_dir`: generated once into the
    cache beside it (`modeling.cache_root`), where launch/train.py and launch/reference.py both find it."""
    return ensure_demo_data(os.path.join(cache_root(output_dir), "demo_data"))


def ensure_demo_data(target: str) -> dict:
    """Generate the demo set once (deterministic), atomically, so ranks and reruns share it; a cache made before a
    split existed gets the missing files. Returns the paths of its train, eval and reference splits."""
    paths = {name: os.path.join(target, f"{name}.jsonl") for name in ("train", "eval", "reference")}
    if not all(os.path.exists(p) for p in paths.values()):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".demo_", dir=os.path.dirname(target))
        try:
            make_demo_data(tmp, seed=0)
            try:
                os.rename(tmp, target)
            except OSError:  # someone else finished first (theirs is identical), or a cache older than a split
                for name in os.listdir(tmp):
                    if not os.path.exists(os.path.join(target, name)):
                        os.replace(os.path.join(tmp, name), os.path.join(target, name))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return paths


def _prepare(run: RunConfig, out: str) -> Prepared:
    cache = cache_root(out)
    train_spec, eval_spec = run.data, run.eval_data
    if train_spec is None:
        demo = demo_data(out)
        train_spec = demo["train"]
        eval_spec = eval_spec or demo["eval"]
    report = SkipReport()
    examples = load_examples(train_spec, fmt=run.data_format, on_bad_record=run.on_bad_record, report=report)
    eval_examples = (load_examples(eval_spec, fmt=run.data_format, on_bad_record=run.on_bad_record, report=report,
                                   split="validation") if eval_spec else [])
    model_path = run.model
    if model_path is None:
        texts = [m["content"] for e in examples for m in e.messages]
        model_path = build_default_model(texts, cache, seed=run.seed)
    tokenizer = load_tokenizer(model_path, run.trust_remote_code, run.chat_template)
    tokenized = os.path.join(cache, "tokenized")  # Arrow files keyed by data + tokenizer + max_seq_len
    encoded = encode_cached(examples, tokenizer, run.max_seq_len, run.on_bad_record, report, tokenized,
                            run.dataset_num_proc)
    eval_encoded = (encode_cached(eval_examples, tokenizer, run.max_seq_len, "skip", report, tokenized,
                                  run.dataset_num_proc) if eval_examples else [])
    pool = encoded.usable()
    if not pool:
        raise DataError(train_spec, None, f"no usable training sample (see {out}/bad_records.json)",
                        "at least one record with a supervised token", kind="no_records", skippable=False)
    return Prepared(examples, eval_examples, encoded, eval_encoded, pool, tokenizer, model_path, report, train_spec,
                    eval_spec)


def prepare_data_and_model(run: RunConfig, local_rank: int, out: str) -> Prepared:
    """Load (or generate) the data, build or locate the model directory, tokenize. Collective: local rank 0 of
    each node goes first (it builds the default model, the demo data and the tokenized Arrow files into the cache
    `out` shares), the others wait, then read them (a tokenization cache hit: nothing is tokenized twice)."""
    if local_rank == 0:
        prep = _prepare(run, out)
    comm.barrier()
    if local_rank != 0:
        prep = _prepare(run, out)
    return prep


def resolve_here(run: RunConfig, world: int, num_train_samples: int | None = None) -> Resolved:
    """`config.resolve` with this machine's accelerator: "auto" precision becomes bf16 only where it exists."""
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    return resolve(run, world, accelerator=accel.device_name(),
                   bf16_supported=bool(getattr(accel, "is_bf16_supported", lambda: False)()),
                   num_train_samples=num_train_samples,
                   fp16_supported=bool(getattr(accel, "is_fp16_supported", lambda: False)()))


class Engine(NamedTuple):
    """What `build_engine` returns: the DeepSpeed engine, its parameter count (all, frozen included), objects to keep
    alive while it lives (HfDeepSpeedConfig under ZeRO-3), and how the model was fitted (`model_info`)."""

    engine: object
    n_params: int
    keep_alive: object
    info: dict


def fit_model(model, rs: Resolved) -> tuple[object, dict]:
    """Activation checkpointing and LoRA as the run's flags ask, before `deepspeed.initialize` (ZeRO-3 included).
    Returns (model, {"attn_implementation", "gradient_checkpointing", "use_reentrant", "peft", "trainable_params"})."""
    opts = rs.run
    info = {"attn_implementation": attention_in_use(model), "gradient_checkpointing": bool(opts.gradient_checkpointing),
            "use_reentrant": None, "peft": None}
    if opts.load_in_4bit and rs.zero_stage != 3:
        from peft import prepare_model_for_kbit_training

        # fp32 norms and input gradients for a 4-bit base; under ZeRO-3 (sharded QLoRA) TRL skips this too
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(opts.gradient_checkpointing),
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        info["use_reentrant"] = False if opts.gradient_checkpointing else None
    elif opts.gradient_checkpointing:
        info["use_reentrant"] = enable_gradient_checkpointing(model, opts.use_peft and rs.zero_stage == 3)
    if opts.use_peft:
        model = wrap_lora(model, opts)
        info["peft"] = {"method": "lora", "r": opts.lora_r, "alpha": opts.lora_alpha, "dropout": opts.lora_dropout,
                        "target_modules": list(opts.lora_target_modules),
                        "modules_to_save": list(opts.lora_modules_to_save or []), "load_in_4bit": opts.load_in_4bit}
    info["trainable_params"] = int(sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()
                                       if p.requires_grad))
    return model, info


def build_engine(prep: Prepared, rs: Resolved) -> Engine:
    """The DeepSpeed engine for the prepared model under the resolved config: loaded with the run's attention kernel
    and quantization, checkpointing and LoRA applied, then `deepspeed.initialize` on the trainable parameters."""
    import deepspeed

    model, keep_alive = load_model(prep.model_path, rs.ds, rs.run.trust_remote_code, options=rs.run)
    check_vocab(prep.tokenizer, model, prep.model_path)
    model, info = fit_model(model, rs)
    engine, _, _, _ = deepspeed.initialize(model=model, config=rs.ds,
                                           model_parameters=[p for p in model.parameters() if p.requires_grad])
    n_params = int(sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters()))
    return Engine(engine, n_params, keep_alive, info)
