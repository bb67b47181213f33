"""The training recipe, top to bottom: setup -> (draw, score, gather, select, broadcast, train)* -> save.

DESIGN §2 steps 1-6. Selection (optbatch_ds.selection) is a pure function called on rank 0;
communication (optbatch_ds.comm) moves tensors; this file only calls them in order, times each
part of the step, and writes one line per step to metrics.jsonl and selection.jsonl.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from optbatch_ds import comm
from optbatch_ds.config import Resolved, RunConfig, planned_steps, resolve
from optbatch_ds.checkpoint import find_resume, load_rng, save_rng, write_complete_marker


_LOGGED_INFO = ("mean_loss_candidates", "mean_loss_selected", "quotas", "stratum_sizes", "diversity_kept",
                "diversity_random", "excluded_nonfinite", "drop_rate", "suspects", "outlier_fence",
                "inverse_temperature")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite: stopping beats training on garbage."""


def log0(*msg) -> None:
    """Print on rank 0 only: the one place rank-0 logging goes through."""
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(*msg, flush=True)


# ---------------------------------------------------------------------------- batches and losses

def collate(encoded: list, pad_id: int, device) -> dict:
    """Right-pad a list of `Encoded` to the longest; labels -100 on padding."""
    width = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for r, e in enumerate(encoded):
        n = len(e.input_ids)
        ids[r, :n] = torch.tensor(e.input_ids)
        labels[r, :n] = torch.tensor(e.labels)
        mask[r, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def per_sample_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token NLL over each sample's supervised tokens (differentiable; position t predicts t+1)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100
    tok = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.clamp_min(0).reshape(-1),
                          reduction="none").view_as(shift_labels)
    n = mask.sum(1)
    return (tok * mask).sum(1) / n.clamp_min(1) + torch.where(n > 0, 0.0, float("nan"))


# ---------------------------------------------------------------------------- step 2: scoring

class _LmHeadInput:
    """Captures the input of the output layer during a forward (the h_t of DESIGN §2)."""

    def __init__(self, model):
        self.value = None
        self.handle = model.get_output_embeddings().register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.value = args[0]

    def remove(self):
        self.handle.remove()


@torch.no_grad()
def score_candidates(engine, batch_items: list, pad_id: int, ob, inv_sqrt_v, projection, batch_size: int,
                     timers: dict) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Per-sample loss and (if the method needs them) sketches for this rank's candidates."""
    from optbatch_ds.scoring import hidden_features, output_layer_features, per_sample_loss

    model = engine.module
    was_training = model.training
    model.eval()
    capture = _LmHeadInput(model)
    losses, feats, tokens = [], [], 0
    try:
        for s in range(0, len(batch_items), batch_size):
            batch = collate(batch_items[s:s + batch_size], pad_id, engine.device)
            tokens += int(batch["attention_mask"].sum())
            t0 = time.perf_counter()
            out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            t1 = time.perf_counter()
            timers["score_forward"] += t1 - t0
            if not ob.needs_features or ob.feature == "hidden":
                losses.append(per_sample_loss(out.logits, batch["labels"]).float().cpu())
                if ob.needs_features:
                    feats.append(hidden_features(capture.value, batch["labels"], projection=projection).float().cpu())
            else:
                l, f = output_layer_features(capture.value, out.logits, batch["labels"],
                                             inv_sqrt_v=inv_sqrt_v if ob.feature == "grad_curvature" else None,
                                             projection=projection, vocab_chunk=ob.vocab_chunk)
                losses.append(l.float().cpu())
                feats.append(f.float().cpu())
            timers["features"] += time.perf_counter() - t1
    finally:
        capture.remove()
        if was_training:
            model.train()
    return torch.cat(losses), (torch.cat(feats) if feats else None), tokens


class Choice(NamedTuple):
    """What steps 2-5 decided: positions into the candidate list and weights (identical on every rank),
    the selector's info (rank 0), the gathered losses / sketches (rank 0, None if not scored)."""

    positions: torch.Tensor
    weights: torch.Tensor
    info: dict
    losses: torch.Tensor | None
    sketches: torch.Tensor | None
    score_tokens: int
    curvature: bool


def choose_batch(engine, items: list, step: int, ob, selector, c: int, b: int, *, pad_id: int, projection,
                 score_bs: int, curvature, timers: dict, rank: int) -> Choice:
    """DESIGN §2 steps 2-5 for one pool: score this rank's candidates `items`, gather to rank 0, select b
    of the c there, broadcast, check every rank holds the same. `curvature()` returns 1/sqrt(v + eps) (or
    None); it is called, collectively, only when the features need it. Shared by every entry point."""
    info: dict = {}
    all_losses = all_sketches = inv_sqrt_v = None
    score_tokens = 0
    if ob.needs_scores:
        t0 = time.perf_counter()
        inv_sqrt_v = curvature() if ob.needs_features and ob.feature == "grad_curvature" else None
        timers["curvature"] = time.perf_counter() - t0
        losses, sketches, score_tokens = score_candidates(engine, items, pad_id, ob, inv_sqrt_v, projection,
                                                          score_bs, timers)
        t0 = time.perf_counter()
        all_losses = comm.gather_to_rank0(losses)
        all_sketches = comm.gather_to_rank0(sketches) if sketches is not None else None
        timers["gather"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    positions = weights = None
    if rank == 0:
        result = selector(step, all_losses if ob.needs_scores else torch.zeros(c), all_sketches, b)
        positions = torch.as_tensor(result.indices, dtype=torch.long)
        weights = torch.as_tensor(result.weights, dtype=torch.float32)
        info = dict(result.info)
    timers["select"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    positions = comm.broadcast_from_rank0(positions, (b,), torch.long)
    weights = comm.broadcast_from_rank0(weights, (b,), torch.float32)
    comm.check_agreement(torch.cat([positions.double(), weights.double()]), step=step)
    timers["broadcast"] = time.perf_counter() - t0
    return Choice(positions, weights, info, all_losses, all_sketches, score_tokens, inv_sqrt_v is not None)


def sketch_projection(module, ob):
    """R of DESIGN §2 for this model's feature size (vocab rows, or hidden size for the "hidden" ablation);
    None when the method needs no features or sketch_dim does not reduce them. Shared by every entry point."""
    from optbatch_ds.scoring import SketchProjection

    weight = module.get_output_embeddings().weight
    feat_in = module.config.hidden_size if ob.feature == "hidden" else (getattr(weight, "ds_shape", None) or weight.shape)[0]
    return (SketchProjection(feat_in, ob.sketch_dim, seed=ob.seed)
            if ob.needs_features and 0 < ob.sketch_dim < feat_in else None)


def train_on(engine, encoded: list, ids: list, weights: torch.Tensor, pad_id: int, micro: int, accum: int,
             world: int, step: int, last_ckpt: str | None = None) -> tuple[float, int]:
    """Step 6: forward, backward and optimizer step on this rank's share `ids`, micro-batch by micro-batch.
    Returns (sum of per-sample losses, trained tokens). Raises NonFiniteLossError on every rank together."""
    loss_sum, train_tokens = 0.0, 0
    for m in range(accum):
        mids = ids[m * micro:(m + 1) * micro]
        batch = collate([encoded[i] for i in mids], pad_id, engine.device)
        train_tokens += int(batch["attention_mask"].sum())
        outp = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        per = per_sample_nll(outp.logits, batch["labels"])
        loss = (per * weights[m * micro:(m + 1) * micro].to(per.device)).mean()
        # every rank must stop together, or the others would hang in the next collective
        flag = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=comm.comm_device())
        if world > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if float(flag.item()) > 0:
            bad_ids = comm.all_gather_objects([i for i, l in zip(mids, per.tolist()) if not math.isfinite(l)])
            raise NonFiniteLossError(
                f"non-finite training loss at step {step} (samples {sorted(sum(bad_ids, []))}); "
                f"last good checkpoint: {last_ckpt or 'none'}")
        engine.backward(loss)
        engine.step()
        loss_sum += float(per.detach().sum())
    return loss_sum, train_tokens


# ---------------------------------------------------------------------------- setup helpers

def _prepare_data_and_model(run: RunConfig, rank: int, local_rank: int, out: str):
    """Load (or generate) data, build or locate the model directory, tokenize. Returns a dict."""
    from optbatch_ds.data import SkipReport, encode_examples, load_examples
    from optbatch_ds.modeling import build_default_model, cache_root, check_vocab, load_tokenizer

    cache = cache_root(out)
    train_spec, eval_spec = run.data, run.eval_data
    if train_spec is None:
        demo = _ensure_demo_data(os.path.join(cache, "demo_data"))
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
    tokenizer = load_tokenizer(model_path, run.trust_remote_code)
    encoded = encode_examples(examples, tokenizer, run.max_seq_len, run.on_bad_record, report)
    eval_encoded = encode_examples(eval_examples, tokenizer, run.max_seq_len, "skip", report) if eval_examples else []
    pool = [i for i, e in enumerate(encoded) if e is not None and e.n_supervised > 0]
    if not pool:
        raise ValueError(f"no usable training sample in {train_spec} (see {out}/bad_records.json)")
    return dict(examples=examples, eval_examples=eval_examples, encoded=encoded, eval_encoded=eval_encoded,
                pool=pool, tokenizer=tokenizer, model_path=model_path, report=report, train_spec=train_spec,
                eval_spec=eval_spec, check_vocab=check_vocab)


def prepare_data_and_model(run: RunConfig, rank: int, local_rank: int, out: str) -> dict:
    """`_prepare_data_and_model` on every rank, local rank 0 of each node first (it builds the default model
    and the demo data into the cache; the others wait, then read it). Collective."""
    if local_rank == 0:
        prep = _prepare_data_and_model(run, rank, local_rank, out)
    comm.barrier()
    if local_rank != 0:
        prep = _prepare_data_and_model(run, rank, local_rank, out)
    return prep


def _ensure_demo_data(target: str) -> dict:
    """Generate the demo set once (deterministic), atomically, so ranks and reruns share it."""
    import shutil
    import tempfile

    from optbatch_ds.data.demo import make_demo_data

    paths = {"train": os.path.join(target, "train.jsonl"), "eval": os.path.join(target, "eval.jsonl")}
    if not os.path.exists(paths["eval"]):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".demo_", dir=os.path.dirname(target))
        try:
            make_demo_data(tmp, seed=0)
            try:
                os.rename(tmp, target)
            except OSError:
                pass  # someone else finished first; theirs is identical
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return paths


def _param_count(model) -> int:
    return int(sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()))


class _Preemption:
    """SIGTERM (Slurm's preemption) asks for a checkpoint at the end of the current step."""

    def __init__(self):
        self.requested = False
        self._old = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._old)


# ---------------------------------------------------------------------------- the recipe

def train(run: RunConfig, rank: int, world: int, local_rank: int) -> dict | None:
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from optbatch_ds.data import EpochSampler
    from optbatch_ds.evaluate import evaluate, format_table
    from optbatch_ds.modeling import load_model
    from optbatch_ds.scoring import curvature_inv_sqrt
    from optbatch_ds.selection import Selector, mean_nn_distance

    out = os.path.abspath(run.output_dir)
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(run.seed)
    random.seed(run.seed)
    np.random.seed(run.seed)

    # --- setup: config (checked before the data and model load: a typo costs seconds, not minutes), data, model
    accel = get_accelerator()
    resolve(run, world, accelerator=accel.device_name(),
            bf16_supported=bool(getattr(accel, "is_bf16_supported", lambda: False)()))
    prep = prepare_data_and_model(run, rank, local_rank, out)
    rs: Resolved = resolve(run, world, accelerator=accel.device_name(),
                           bf16_supported=bool(getattr(accel, "is_bf16_supported", lambda: False)()),
                           num_train_samples=len(prep["pool"]))
    ob = rs.optbatch
    total_steps = planned_steps(run, len(prep["pool"]), rs.candidates)
    tok = prep["tokenizer"]
    if rank == 0:
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump({**rs.to_json(), "model_path": prep["model_path"], "train_data": prep["train_spec"],
                       "eval_data": prep["eval_spec"], "planned_steps": total_steps}, f, indent=2, default=str)
        prep["report"].write(os.path.join(out, "bad_records.json"))
        if prep["report"].count():
            log0(f"skipped {prep['report'].count()} records (listed in {out}/bad_records.json)")
    model, _keep_alive = load_model(prep["model_path"], rs.ds, run.trust_remote_code)
    prep["check_vocab"](tok, model, prep["model_path"])
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                           config=rs.ds)
    n_params = _param_count(engine.module)
    stage3 = rs.ds.get("zero_optimization", {}).get("stage", 0) == 3
    projection = sketch_projection(engine.module, ob)
    sampler = EpochSampler(len(prep["pool"]), seed=run.seed)
    selector = Selector(ob.selection_config(), total_steps=total_steps)
    score_bs = ob.score_batch_size or 2 * rs.micro_batch_size

    log0(f"optbatch_ds | world {world} | model {prep['model_path']} ({n_params / 1e6:.2f}M params) | "
         f"train {len(prep['pool'])} samples | method {ob.method} | prune {ob.prune_ratio} | "
         f"b {rs.train_batch_size} of c {rs.candidates} per step | {total_steps} steps")

    # --- resume
    start_step, totals = 0, {"samples_trained": 0, "samples_scored": 0, "tokens_trained": 0, "flops": 0.0}
    ckpt_root = os.path.join(out, "checkpoints")
    resume_dir = find_resume(run.resume, ckpt_root)
    if resume_dir is not None:
        load_dir, tag = os.path.dirname(resume_dir), os.path.basename(resume_dir)
        _, client = engine.load_checkpoint(load_dir, tag=tag)
        if client is None:
            raise RuntimeError(f"could not load checkpoint {resume_dir}")
        start_step = int(client["step"])
        sampler.load_state_dict(client["sampler"])
        selector.load_state_dict(client["selector"])
        totals = client["totals"]
        load_rng(resume_dir, rank)
        saved = client.get("config", {})
        for key, value in saved.items():  # config and checkpoint disagreeing is a warning naming both
            if getattr(ob, key, value) != value:
                log0(f"warning: resuming with optbatch.{key}={getattr(ob, key)!r} but the checkpoint was "
                     f"written with {value!r}")
        log0(f"resumed from {resume_dir} at step {start_step}")
    metrics_path = os.path.join(out, "metrics.jsonl")
    selection_path = os.path.join(out, "selection.jsonl")
    if rank == 0:
        for path in (metrics_path, selection_path):  # drop lines past the resumed step (a crashed tail)
            lines = open(path).read().splitlines() if os.path.exists(path) and start_step > 0 else []
            with open(path, "w") as f:
                f.writelines(l + "\n" for l in lines if l.strip() and json.loads(l).get("step", 0) <= start_step)

    def save(step: int) -> str:
        tag = f"step_{step:06d}"
        client = {"step": step, "sampler": sampler.state_dict(), "selector": selector.state_dict(),
                  "totals": dict(totals), "config": dataclasses.asdict(ob)}
        engine.save_checkpoint(ckpt_root, tag=tag, client_state=client)
        save_rng(os.path.join(ckpt_root, tag), rank)
        comm.barrier()
        if rank == 0:
            write_complete_marker(os.path.join(ckpt_root, tag), step)
        comm.barrier()
        return os.path.join(ckpt_root, tag)

    def run_eval(step: int) -> dict | None:
        if not prep["eval_examples"]:
            return None
        t0 = time.perf_counter()
        res = evaluate(engine, tok, prep["eval_examples"], prep["eval_encoded"], rank=rank, world=world,
                       batch_size=max(rs.micro_batch_size, 8), max_new_tokens=run.eval_max_new_tokens,
                       samples_per_task=run.eval_samples_per_task, synced_gpus=stage3 and world > 1)
        if rank == 0:
            res["step"] = step
            res["seconds"] = time.perf_counter() - t0
            log0(format_table(res))
        return res

    # --- the loop: from here on a rank that stops answering is an error within the collective timeout
    comm.set_collective_timeout(run.collective_timeout)
    preempt = _Preemption()
    last_ckpt = find_resume("auto", ckpt_root) if os.path.isdir(ckpt_root) else None
    progress = None
    if rank == 0:
        from tqdm import tqdm

        progress = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, mininterval=1.0)
    c, b = rs.candidates, rs.train_batch_size
    cpr, bpr = rs.candidates_per_rank, rs.batch_per_rank
    evals, history = [], []  # history: the selected indices of every step, as this rank holds them
    step = start_step
    engine.train()
    t_run = time.perf_counter()
    try:
        while step < total_steps:
            step += 1
            timers = dict.fromkeys(("draw", "curvature", "score_forward", "features", "gather", "select",
                                    "broadcast", "train", "diagnostics"), 0.0)
            t_step = time.perf_counter()
            # 1. draw: every rank computes the same pool; rank r scores its slice
            t0 = time.perf_counter()
            cand = [prep["pool"][p] for p in sampler.draw(c)]
            mine = cand[rank * cpr:(rank + 1) * cpr]
            timers["draw"] = time.perf_counter() - t0
            # 2-5. score, gather, select on rank 0, broadcast + agreement check
            choice = choose_batch(engine, [prep["encoded"][i] for i in mine], step, ob, selector, c, b,
                                  pad_id=tok.pad_token_id, projection=projection, score_bs=score_bs,
                                  curvature=lambda: curvature_inv_sqrt(engine, ob.eps), timers=timers, rank=rank)
            sel_pos, weights, info, score_tokens = choice.positions, choice.weights, choice.info, choice.score_tokens
            all_losses, all_sketches = choice.losses, choice.sketches
            if rank == 0 and all_sketches is not None:
                # diagnostics, timed apart from selection: how much diversity the choice bought
                t0 = time.perf_counter()
                finite = torch.isfinite(all_sketches).all(1) & torch.isfinite(all_losses)
                pool_pos = torch.nonzero(finite).flatten()
                gen = torch.Generator().manual_seed(ob.seed * 7919 + step)
                rnd = pool_pos[torch.randperm(len(pool_pos), generator=gen)[:b]].numpy()
                info["diversity_kept"] = float(mean_nn_distance(all_sketches, sel_pos.numpy()))
                info["diversity_random"] = float(mean_nn_distance(all_sketches, rnd))
                timers["diagnostics"] = time.perf_counter() - t0
            selected = [cand[p] for p in sel_pos.tolist()]
            history.append(selected)
            # 6. train on this rank's share, micro-batch by micro-batch
            t0 = time.perf_counter()
            my_sel = selected[rank * bpr:(rank + 1) * bpr]
            my_w = weights[rank * bpr:(rank + 1) * bpr]
            loss_sum, train_tokens = train_on(engine, prep["encoded"], my_sel, my_w, tok.pad_token_id,
                                              rs.micro_batch_size, rs.grad_accum, world, step, last_ckpt)
            timers["train"] = time.perf_counter() - t0
            # reduce the step's counters (and the preemption flag) across ranks in one collective
            stats = torch.tensor([loss_sum, float(train_tokens), float(score_tokens), 1.0 if preempt.requested else 0.0],
                                 dtype=torch.float64)
            if world > 1:
                s = stats.to(comm.comm_device())
                torch.distributed.all_reduce(s)
                stats = s.cpu()
            step_time = time.perf_counter() - t_step
            totals["samples_trained"] += b
            totals["samples_scored"] += c if ob.needs_scores else 0
            totals["tokens_trained"] += int(stats[1])
            totals["flops"] += 6.0 * n_params * float(stats[1]) + 2.0 * n_params * float(stats[2])
            record = {"step": step, "epoch": sampler.epoch, "loss": float(stats[0]) / b,
                      "lr": float(engine.get_lr()[0]) if engine.get_lr() else None,
                      "candidates": c, "trained": b, "tokens": int(stats[1]), "score_tokens": int(stats[2]),
                      "tokens_per_s": float(stats[1] + stats[2]) / max(step_time, 1e-9),
                      "time": {k: round(v, 6) for k, v in {**timers, "total": step_time}.items()},
                      "wall": round(time.perf_counter() - t_run, 3), **totals,
                      **{k: v for k, v in info.items() if k in _LOGGED_INFO}}
            if rank == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                with open(selection_path, "a") as f:
                    line = {"step": step, "candidates": cand, "selected": selected}
                    if not torch.all(weights == 1):
                        line["weights"] = [round(float(x), 6) for x in weights]
                    if "quotas" in info:
                        line["quotas"] = info["quotas"]
                    if all_losses is not None:  # the candidates' scores, for offline analysis
                        line["losses"] = [round(x, 4) if math.isfinite(x) else None for x in all_losses.tolist()]
                    f.write(json.dumps(line) + "\n")
                progress.update(1)
                progress.set_postfix_str(f"loss {record['loss']:.4f} | {record['tokens_per_s']:.0f} tok/s", refresh=False)
                if run.log_every and step % run.log_every == 0:
                    t = record["time"]
                    progress.write(f"step {step:6d} | loss {record['loss']:.4f} | kept {b}/{c} | "
                                   f"score {t['score_forward'] + t['features']:.3f}s | sel {t['select']:.3f}s | "
                                   f"comm {t['gather'] + t['broadcast']:.3f}s | train {t['train']:.3f}s | "
                                   f"{record['tokens_per_s']:.0f} tok/s")
            if stats[3] > 0:  # preempted: save and leave cleanly so a requeued job resumes here
                last_ckpt = save(step)
                log0(f"SIGTERM: saved {last_ckpt} at step {step}; exiting for requeue")
                return {"preempted": True, "step": step, "history": history, "rank": rank}
            if run.save_every and step % run.save_every == 0 and step < total_steps:
                last_ckpt = save(step)
            if run.eval_every and step % run.eval_every == 0 and step < total_steps:
                res = run_eval(step)
                if rank == 0 and res is not None:
                    evals.append(res)
                    with open(os.path.join(out, "eval_history.jsonl"), "a") as f:
                        f.write(json.dumps({k: v for k, v in res.items() if k != "samples"}) + "\n")
    finally:
        preempt.restore()
        if progress is not None:
            progress.close()

    # --- save, evaluate, export
    if step > start_step or not os.path.isdir(os.path.join(ckpt_root, f"step_{step:06d}")):
        last_ckpt = save(step)
    result = run_eval(step)
    if rank == 0 and result is not None:
        with open(os.path.join(out, "eval.json"), "w") as f:
            json.dump(result, f, indent=2)
        with open(os.path.join(out, "eval_history.jsonl"), "a") as f:
            f.write(json.dumps({k: v for k, v in result.items() if k != "samples"}) + "\n")
    if run.export:
        from optbatch_ds.export import export_hf

        export_hf(engine, tok, os.path.join(out, "final"), rank=rank, stage3=stage3)
        log0(f"exported Hugging Face model to {os.path.join(out, 'final')}")
    return {"step": step, "eval": result, "totals": totals, "history": history, "rank": rank}


def main(argv=None) -> int:
    from optbatch_ds.config import parse_args

    run = parse_args(argv)
    rank, world, local_rank = comm.init_distributed(run.collective_timeout)
    try:
        train(run, rank, world, local_rank)
    finally:
        comm.cleanup()
    return 0
