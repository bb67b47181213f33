"""Reference losses for the `reducible` signal (RHO-LOSS; JEST's "learnability"): a small model trained on
clean data scores every training record once, and the selection prefers what the learner has not learned
yet but the reference finds learnable (learner loss minus reference loss).

Run as:
    python launch/reference.py --output refs/demo      # the demo set, judged by a model of its clean reference split
    python launch/reference.py --data train.jsonl --reference-data clean.jsonl --output refs/
    python launch/reference.py --data train.jsonl --output refs/          # holdout-free: two halves of train
    deepspeed --num_gpus 2 launch/train.py --deepspeed ds_configs/zero3.json --data train.jsonl --reference-losses refs/

With `--reference-data CLEAN` one reference model is trained on CLEAN and scores every training record; with
no `--data`, the demo set (as launch/train.py generates it) is scored, and its clean reference split (300
records per task, disjoint from the held-out ones) is CLEAN unless `--reference-data` says otherwise. With
`--model BASE --epochs 0` the model is not trained at all: a pretrained base scores every record as it is (the
fine-tuning regime, where the base already knows the facts the records state; cost: one forward per record).
Without it (most users have no clean set) the holdout-free variant trains two reference models on the two
halves of the training set (split by record hash, so exact duplicates stay in one half) and each scores the
other half: a record is never scored by a model that trained on it. The reference models are trained by
this package's own recipe (`trainer.Recipe`, method "full"): by default the built-in architecture at
`--model-size nano`, 7 epochs at learning rate 1.5e-2, with the tokenizer the learner's built-in model gets
from the same training data (so per-token losses are comparable); `--model` takes a Hugging Face model
instead (it should share the learner's tokenizer).

Writes to DIR:
    reference_losses.jsonl   {"hash", "loss", "model"} per distinct training record (data.hashing.record_hash:
                             a reordered or filtered training file still matches; unmatched records are
                             counted by the trainer and get the mean reference loss)
    cost.json                training and scoring FLOPs and wall seconds of every reference model, and their
                             sums: counted in every comparison (the trainer adds them to its FLOPs and the
                             benchmark to its wall time). Wall seconds are counted as the learner's are: the
                             training steps and the scoring forwards; start-up, the last checkpoint and the
                             encoding of the records (which the learner's start-up does too) are in
                             `overhead_wall_s`, reported beside them
    ref_<name>/              each reference model's run directory (config.json, metrics.jsonl)
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass

import torch

from optbatch_ds import comm
from optbatch_ds.batching import padded_shard
from optbatch_ds.comm import log0
from optbatch_ds.config import RunConfig, build_arg_parser as _run_flags, parse_known
from optbatch_ds.data import SkipReport, encode_examples, example_record, load_examples
from optbatch_ds.data.hashing import example_hash
from optbatch_ds.errors import ConfigError
from optbatch_ds.modeling import MODEL_SIZES, build_default_model, cache_root
from optbatch_ds.scoring.forward import Scorer
from optbatch_ds.session import demo_data
from optbatch_ds.signals import COST_FILE, LOSSES_FILE

# The built-in reference: the smallest architecture, a few passes at a high rate. Reference sets are small and
# must be learned well; on the demo's 900 clean records a nano model (0.09M parameters) after 7 epochs at 1.5e-2
# ranks wrong answers above right ones about as rarely as a tiny one (0.24M) after 20 at 1e-3, at a sixth of the
# FLOPs, and 3 epochs at 1e-3 leave it a poor judge (BENCHMARKS.md §5, reference models).
DEFAULT_EPOCHS = 7.0
DEFAULT_MODEL_SIZE = "nano"
DEFAULT_REFERENCE_LR = 1.5e-2
_SHARED = ("deepspeed", "data", "data_format", "chat_template", "model", "max_seq_len", "seed", "learning_rate",
           "trust_remote_code", "collective_timeout")


# ---------------------------------------------------------------------------- building

@dataclass
class ReferenceJob:
    """launch/reference.py's flags: the training data to score, the reference data (None: holdout-free),
    the reference model (an HF directory, or the built-in architecture at `model_size`), and how to train it."""

    run: RunConfig           # --data (the training records to score), --deepspeed, --model, --seed, ...
    reference_data: str | None
    model_size: str
    epochs: float
    output: str


def build_arg_parser():
    p = _run_flags("Train a small reference model on clean data and score every training record once "
                   "(reference losses for the 'reducible' signal).", names=_SHARED, prog="launch/reference.py")
    p.add_argument("--reference-data", default=None, help="Clean records to train the reference model on (never "
                   "the evaluation split); omit for the holdout-free variant (two models on two halves of --data).")
    p.add_argument("--model-size", default=DEFAULT_MODEL_SIZE, choices=sorted(MODEL_SIZES),
                   help=f"Size of the built-in architecture when --model is not given (default {DEFAULT_MODEL_SIZE}; "
                        f"its learning rate defaults to {DEFAULT_REFERENCE_LR}).")
    p.add_argument("--epochs", type=float, default=DEFAULT_EPOCHS, help="Passes over the reference data (default "
                   f"{DEFAULT_EPOCHS:g}); 0 scores every record with --model as it is (a pretrained base as its own "
                   "reference: no training).")
    p.add_argument("--output", required=True, help="Folder for reference_losses.jsonl, cost.json and the runs.")
    return p


def parse_args(argv=None) -> ReferenceJob:
    args = parse_known(build_arg_parser(), argv)
    if not args.epochs >= 0:
        raise ConfigError(f"--epochs {args.epochs} must be >= 0")
    if args.epochs == 0 and (args.model is None or args.reference_data is not None):
        raise ConfigError("--epochs 0 scores the training records with --model as it is: give --model (the pretrained "
                          "base) and no --reference-data")
    run = RunConfig(**{k: getattr(args, k) for k in _SHARED if getattr(args, k) is not None})
    return ReferenceJob(run, args.reference_data, args.model_size, args.epochs, os.path.abspath(args.output))


def _reference_model(job: ReferenceJob, examples: list, local_rank: int) -> str:
    """--model, or the built-in architecture at --model-size with the learner's default tokenizer (trained on
    the same training texts). Collective: local rank 0 builds, the others wait and reuse it."""
    if job.run.model is not None:
        return job.run.model
    texts = [m["content"] for e in examples for m in e.messages]
    build = lambda: build_default_model(texts, cache_root(job.output), seed=job.run.seed,  # noqa: E731
                                        config_overrides=MODEL_SIZES[job.model_size])
    path = build() if local_rank == 0 else None
    comm.barrier()
    return path or build()


def _parts(job: ReferenceJob, examples: list, hashes: list[str]) -> list[tuple[str, str, list[int]]]:
    """(name, training file, indices of the examples it scores) of every reference model. Rank 0 writes the
    holdout-free halves (records keep their turns, tools, untrained turns and task); the others wait for them."""
    if job.reference_data is not None:
        return [("clean", job.reference_data, list(range(len(examples))))]
    if job.epochs == 0:  # the given model as it is: nothing is trained, so nothing needs holding out
        return [("base", job.run.data, list(range(len(examples))))]
    halves = [[i for i, h in enumerate(hashes) if int(h, 16) % 2 == part] for part in (0, 1)]
    files = [os.path.join(job.output, f"half_{name}.jsonl") for name in ("a", "b")]
    if comm.rank_and_world()[0] == 0:
        os.makedirs(job.output, exist_ok=True)
        for members, file in zip(halves, files):
            with open(file, "w", encoding="utf-8") as f:
                for i in members:
                    f.write(json.dumps(example_record(examples[i]), ensure_ascii=False) + "\n")
    comm.barrier()
    return [("a", files[0], halves[1]), ("b", files[1], halves[0])]


def _score(recipe, encoded: list) -> tuple[list[float], int]:
    """Every encoded example's mean token NLL under the recipe's (trained) model, NaN where it has none (None: no
    supervised token within max_seq_len), on rank 0 ([] elsewhere); and the tokens scored on all ranks.
    Collective."""
    usable = [i for i, e in enumerate(encoded) if e is not None]
    rs = recipe.rs
    scorer = Scorer("grad_raw", rs.optbatch.vocab_chunk, False, None, 2 * rs.micro_batch_size,
                    recipe.prep.tokenizer.pad_token_id)
    rank, world = comm.rank_and_world()
    out = [math.nan] * len(encoded)
    if not usable:  # the same on every rank: nothing to score anywhere
        return (out if rank == 0 else []), 0
    mine = padded_shard(usable, rank, world)  # equal slices: ZeRO-3 forwards are collective
    losses, _, tokens = scorer.score(recipe.engine, [encoded[i] for i in mine], None,
                                     {"score_forward": 0.0, "features": 0.0})
    gathered = comm.gather_to_rank0(losses)
    tokens = int(comm.sum_over_ranks(torch.tensor([float(tokens)], dtype=torch.float64))[0])
    if gathered is None:
        return [], tokens
    for i, value in zip(usable, gathered[:len(usable)].tolist()):
        out[i] = value
    return out, tokens


def _train_and_score(job: ReferenceJob, name: str, train_file: str, targets: list, model: str, ctx: tuple) -> dict:
    """One reference model: train it with the package's recipe (method full; with epochs 0 the engine is built and
    nothing trained), score `targets`. Collective."""
    from optbatch_ds.trainer import Recipe

    rank, world, local_rank = ctx
    # a built-in reference model starts from scratch on a small set: a high rate, not a fine-tuning one
    lr = job.run.learning_rate or (DEFAULT_REFERENCE_LR if job.run.model is None else None)
    run = dataclasses.replace(job.run, model=model, data=train_file, eval_data=None, method="full", prune_ratio=None,
                              epochs=job.epochs or 1.0, max_steps=-1,  # epochs 0: planned, never stepped
                              output_dir=os.path.join(job.output, f"ref_{name}"),
                              export="none", log_every=0, resume=None, learning_rate=lr)
    t0 = time.perf_counter()
    recipe = Recipe.setup(run, rank, world, local_rank)
    if job.epochs > 0:
        recipe.loop()  # the steps, then the last checkpoint and evaluation (no export)
    else:
        recipe.log.end()  # nothing to train: the run's files are closed as loop() would
    encoded = encode_examples(targets, recipe.prep.tokenizer, job.run.max_seq_len, "skip", SkipReport())
    t2 = time.perf_counter()
    losses, tokens = _score(recipe, encoded)
    t3 = time.perf_counter()
    trained = len(recipe.prep.pool) if job.epochs > 0 else 0
    # wall seconds counted like the learner's (its steps' own time): the training steps and the scoring forwards;
    # start-up (model, tokenization, engine), the last checkpoint and the encoding of the targets kept apart
    return {"name": name, "train_file": train_file, "records_trained": trained, "steps": recipe.step,
            "params": recipe.n_params, "train_flops": float(recipe.totals["flops"]),
            "train_wall_s": recipe.step_seconds, "scored": len(targets), "score_tokens": tokens,
            "score_flops": 2.0 * recipe.n_params * tokens, "score_wall_s": t3 - t2,
            "overhead_wall_s": t2 - t0 - recipe.step_seconds, "losses": losses}


def _with_demo_data(job: ReferenceJob) -> ReferenceJob:
    """Without --data: the demo set train.py generates (the same records, so the losses match its run) and, unless
    --reference-data is given or nothing is trained, the demo's clean reference split."""
    if job.run.data is not None:
        return job
    paths = demo_data(job.output)
    clean = job.reference_data or (paths["reference"] if job.epochs > 0 else None)
    return dataclasses.replace(job, run=dataclasses.replace(job.run, data=paths["train"]), reference_data=clean)


def build_reference(job: ReferenceJob, rank: int, world: int, local_rank: int) -> dict | None:
    """The whole job (module docstring); returns the cost summary on rank 0, None elsewhere. Collective."""
    job = _with_demo_data(job)
    examples = load_examples(job.run.data, fmt=job.run.data_format, on_bad_record="skip", report=SkipReport())
    hashes = [example_hash(e) for e in examples]
    model = _reference_model(job, examples, local_rank)
    results = []
    for name, train_file, targets in _parts(job, examples, hashes):
        what = f"training on {train_file}, then scoring" if job.epochs > 0 else "scoring, untrained,"
        log0(f"reference | model {name}: {what} {len(targets)} records")
        res = _train_and_score(job, name, train_file, [examples[i] for i in targets], model, (rank, world, local_rank))
        res["targets"] = targets
        results.append(res)
    if rank != 0:
        comm.barrier()
        return None
    cost = _write(job, hashes, results, model)
    comm.barrier()
    return cost


def _write(job: ReferenceJob, hashes: list[str], results: list[dict], model: str) -> dict:
    """Rank 0: reference_losses.jsonl (one line per distinct record) and cost.json; returns the cost."""
    lines, seen, missing = [], set(), 0
    for res in results:
        for i, loss in zip(res["targets"], res["losses"]):
            if hashes[i] in seen:
                continue
            seen.add(hashes[i])
            missing += loss != loss
            lines.append(json.dumps({"hash": hashes[i], "loss": None if loss != loss else round(loss, 6),
                                     "model": res["name"]}))
    with open(os.path.join(job.output, LOSSES_FILE), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    parts = [{k: v for k, v in r.items() if k not in ("losses", "targets")} for r in results]
    cost = {"model": model, "model_size": None if job.run.model else job.model_size, "epochs": job.epochs,
            "variant": "clean" if job.reference_data else ("base" if job.epochs == 0 else "holdout-free"),
            "reference_data": job.reference_data,
            "records": len(hashes), "distinct_records": len(seen), "unscored": int(missing), "parts": parts,
            "total_flops": sum(p["train_flops"] + p["score_flops"] for p in parts),
            "total_wall_s": sum(p["train_wall_s"] + p["score_wall_s"] for p in parts),
            "overhead_wall_s": sum(p["overhead_wall_s"] for p in parts)}
    with open(os.path.join(job.output, COST_FILE), "w") as f:
        json.dump(cost, f, indent=2)
    log0(f"reference | {len(seen)} distinct records scored ({missing} without a supervised token) | "
         f"{cost['total_flops']:.3g} FLOPs | {cost['total_wall_s']:.1f} s in steps and scoring forwards (+ "
         f"{cost['overhead_wall_s']:.1f} s start-up, checkpoint, encoding) -> {job.output}")
    return cost


def main(argv=None) -> int:
    """launch/reference.py: parse the flags, start the process group, build the reference losses, clean up."""
    job = parse_args(argv)
    rank, world, local_rank = comm.init_distributed(job.run.collective_timeout)
    try:
        build_reference(job, rank, world, local_rank)
    finally:
        comm.cleanup()
    return 0
