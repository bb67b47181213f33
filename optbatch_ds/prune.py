"""Offline OptBatch selection (pruning): score a whole dataset with a model, keep what the selector keeps.

For users who train elsewhere. Run as:
    python launch/prune.py --deepspeed ds_configs/zero3.json --data train.jsonl --output kept.jsonl
    deepspeed --num_gpus 2 launch/prune.py --deepspeed ds_configs/zero3.json --data F --output OUT --warmup-steps 50

The recipe, on every rank unless said otherwise, on the same step functions as launch/train.py
(`optbatch_ds.step`):
  1. data, tokenizer and model exactly as launch/train.py resolves them (`session.prepare_data_and_model`:
     no --model builds the small default model, no --data generates the demo set);
  2. optional warm-up (--warmup-steps N): the first N steps of `launch/train.py --method random`
     (`step.choose_batch` + `step.train_on`: same sampler, selector, LR schedule and loss), so Adam's second
     moment exists for the curvature features; without it the features use the raw output-layer gradient
     (v = 1), as the trainer's first step does;
  3. the usable samples, in the seeded epoch-0 order of `EpochSampler(n, seed)`, are cut into pools of
     c = candidates per step; each rank scores its slice of a pool (`step.score_and_gather`), rank 0 runs
     the same `Selector` as the trainer (the "optbatch" section: method, strata, temperature, ...) with
     budget b = train_batch_size, selector step = pool id + 1; the last pool, of r < c samples, gets budget
     round(r * (1 - prune_ratio)) (Python's round, half to even) and at most r strata. The temperature
     schedule (temperature_end) does not apply: there is no training progress, so every pool uses
     `temperature`;
  4. rank 0 writes the kept ORIGINAL records, in input order, in the input's own format (.jsonl lines and
     .json array elements byte for byte as they were, .parquet rows via pyarrow; a `datasets` name or a
     folder of mixed files gives .jsonl), plus `<output stem>.selection.jsonl`, one line per input record:
     {"index", "source", "pool", "loss", "stratum", "selected"} ("stratum": the loss stratum `select` put it
     in, null when none: no strata, non-finite, or set aside above the outlier fence; + "skipped": kind for a
     record skipped as bad, + "weight" for infobatch and optbatch with a reweight), and
     `<output stem>.selection.summary.json` (counts, budgets, skipped records, timings). Skipped records are
     counted there and on stderr, never dropped silently.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass

import torch

from optbatch_ds import comm, step as ob_step
from optbatch_ds.batching import padded_shard
from optbatch_ds.comm import log0
from optbatch_ds.config import ConfigError, Resolved, RunConfig, build_arg_parser as _run_flags, parse_known
from optbatch_ds.data import EpochSampler
from optbatch_ds.data.readers import BOM
from optbatch_ds.scoring import CurvaturePolicy, curvature_inv_sqrt
from optbatch_ds.selection import Candidates, Selector
from optbatch_ds.signals import SignalContext, reference_losses, signal_values, task_groups
from optbatch_ds.session import Prepared, build_engine, prepare_data_and_model, resolve_here, seed_everything

SUFFIXES = (".jsonl", ".json", ".parquet")
# Flags shared with launch/train.py (same names, same help text).
_SHARED = ("deepspeed", "model", "data", "data_format", "chat_template", "max_seq_len", "seed", "method", "prune_ratio",
           "reference_losses", "group_by_length",
           "on_bad_record", "trust_remote_code", "learning_rate", "collective_timeout")


# ---------------------------------------------------------------------------- command line

def build_arg_parser():
    """launch/prune.py's flags: train.py's data / model / config flags, plus --output and --warmup-steps."""
    p = _run_flags("Score a dataset with a model and write the part OptBatch keeps (offline pruning).",
                   names=_SHARED, prog="launch/prune.py")
    p.add_argument("--output", required=True, help="The kept records: a file with the input's extension "
                   "(.jsonl for the demo data, a datasets name or a folder of mixed files).")
    p.add_argument("--warmup-steps", type=int, default=0, dest="warmup_steps",
                   help="Train this many steps of the normal recipe with method=random first (Adam state for "
                        "the curvature features); 0 scores the model as it is.")
    return p


def parse_args(argv=None) -> tuple[RunConfig, str, int]:
    args = parse_known(build_arg_parser(), argv)
    run = RunConfig(**{k: getattr(args, k) for k in _SHARED if getattr(args, k) is not None})
    if args.warmup_steps < 0:
        raise ConfigError(f"--warmup-steps {args.warmup_steps} must be >= 0")
    want = output_suffix(run.data)
    if not args.output.endswith(want):
        raise ConfigError(f"--output {args.output}: the kept records are written in the input's own format, "
                          f"so name the output *{want}")
    return run, args.output, args.warmup_steps


def output_suffix(data: str | None) -> str:
    """The extension of the kept file: the input's, or .jsonl (demo data, datasets name, mixed folder)."""
    from optbatch_ds.data.readers import data_files_in

    if data is None or not os.path.exists(data):
        return ".jsonl"
    if os.path.isdir(data):
        kinds = {os.path.splitext(p)[1] for p in data_files_in(data)}
        return kinds.pop() if len(kinds) == 1 else ".jsonl"
    ext = os.path.splitext(data)[1]
    return ext if ext in SUFFIXES else ".jsonl"


def sidecar_paths(output: str) -> tuple[str, str]:
    stem = output[:-len(next(s for s in SUFFIXES if output.endswith(s)))]
    return stem + ".selection.jsonl", stem + ".selection.summary.json"


# ---------------------------------------------------------------------------- the original records

@dataclass
class _Raw:
    source: str     # as the data layer names it ("path:LINE", "path:record N", "name[split]:record N")
    value: object   # the parsed record, or None when it could not be read
    raw: object     # jsonl: the line's bytes; json: the element's text; parquet: row number; datasets: the record
    raw_end: int = 0  # json: where the element's text ends in the file


def _raw_jsonl(path: str) -> list[_Raw]:
    out = []
    with open(path, "rb") as f:  # same line numbering, blank-line and byte-order-mark rules as readers._iter_jsonl
        for lineno, line in enumerate(f, start=1):
            line = line.removeprefix(BOM) if lineno == 1 else line
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                out.append(_Raw(f"{path}:{lineno}", None, line))
                continue
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = None
            out.append(_Raw(f"{path}:{lineno}", value, line))
    return out


def _raw_json_array(path: str) -> list[_Raw]:
    with open(path, "rb") as f:
        text = f.read().removeprefix(BOM).decode("utf-8")  # load_examples accepted the file: a valid array
    decoder, ws, out = json.JSONDecoder(), " \t\r\n", []
    i, line, counted = text.index("[") + 1, 1, 0
    while True:
        while text[i] in ws:
            i += 1
        if text[i] == "]":
            return out
        value, end = decoder.raw_decode(text, i)
        line += text.count("\n", counted, i)
        counted = i
        # keep the indentation of an element that starts its own line, so the output looks like the input
        start = text.rfind("\n", 0, i) + 1
        start = start if start > (out[-1].raw_end if out else 0) and not text[start:i].strip() else i
        out.append(_Raw(f"{path}:{line}", value, text[start:end]))
        out[-1].raw_end = end
        i = end
        while text[i] in ws:
            i += 1
        i += 1 if text[i] == "," else 0


def _raw_parquet(path: str) -> list[_Raw]:
    import datasets

    ds = datasets.Dataset.from_parquet(path)  # the reader the data layer uses, so values match
    return [_Raw(f"{path}:record {i + 1}", rec, i) for i, rec in enumerate(ds)]


def _raw_files(spec: str) -> list[tuple[str, list[_Raw]]]:
    """(file or dataset name, its records in order) for a file, folder or `datasets` name, as load_examples reads it."""
    from optbatch_ds.data.readers import data_files_in, file_kind

    if os.path.isdir(spec) or os.path.isfile(spec):
        paths = data_files_in(spec) if os.path.isdir(spec) else [spec]
        readers = {"jsonl": _raw_jsonl, "json": _raw_json_array, "parquet": _raw_parquet}
        return [(p, readers[file_kind(p)](p)) for p in paths]  # by content, as the data layer reads it
    import datasets

    ds = datasets.load_dataset(spec, split="train")
    return [(spec, [_Raw(f"{spec}[train]:record {i + 1}", rec, rec) for i, rec in enumerate(ds)])]


def _match_examples(files, examples, data_format: str) -> list[tuple[int, int]]:
    """(file, record) of every Example: the records that parse, in order (the data layer's own rule)."""
    from optbatch_ds.data import DataError, detect_format, parse_record

    good = []
    for fi, (_, records) in enumerate(files):
        fmt = data_format if data_format != "auto" else next(
            (detect_format(r.value) for r in records if isinstance(r.value, dict) and detect_format(r.value)), None)
        for ri, r in enumerate(records):
            if fmt is None or r.value is None:
                continue
            try:
                parse_record(r.value, fmt, r.source)
            except DataError:
                continue
            good.append((fi, ri))
    bad = len(good) != len(examples) or any(files[fi][1][ri].source != ex.source
                                            for (fi, ri), ex in zip(good, examples))
    if bad:
        raise RuntimeError("could not map the loaded examples back to the input's records "
                           "(did the input change while selecting?)")
    return good


def _write_atomic(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_kept(files, kept: list[tuple[int, int]], output: str) -> None:
    """The kept records, in input order, in the output's format (see the module docstring)."""
    if output.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = []
        for fi, (path, records) in enumerate(files):
            rows = [records[ri].raw for f, ri in kept if f == fi]
            tables.append(pq.read_table(path).take(rows))
        table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
        tmp = f"{output}.tmp{os.getpid()}"
        pq.write_table(table, tmp)
        os.replace(tmp, output)
        return
    chunks = []
    for fi, ri in kept:
        r = files[fi][1][ri]
        if output.endswith(".json") and isinstance(r.raw, str):  # a .json array element, as it was
            chunks.append(r.raw.encode("utf-8"))
        elif output.endswith(".json"):  # JSON Lines saved as .json
            chunks.append(json.dumps(r.value, ensure_ascii=False, default=str).encode("utf-8"))
        elif isinstance(r.raw, bytes):  # a .jsonl line, byte for byte
            chunks.append(r.raw if r.raw.endswith(b"\n") else r.raw + b"\n")
        else:  # a record from a datasets name, a .json array or parquet in a mixed folder
            chunks.append((json.dumps(r.value, ensure_ascii=False, default=str) + "\n").encode("utf-8"))
    if output.endswith(".json"):
        _write_atomic(output, b"[\n" + b",\n".join(chunks) + b"\n]\n")
    else:
        _write_atomic(output, b"".join(chunks))


# ---------------------------------------------------------------------------- warm-up and selection

@dataclass
class Job:
    """One offline selection: its flags, where it writes, and the ranks (identical on every rank)."""

    run: RunConfig
    output: str
    warmup_steps: int
    rank: int
    world: int


def _warm_up(engine, prep: Prepared, rs: Resolved, job: Job) -> float:
    """The first `job.warmup_steps` steps of `launch/train.py --method random` (full when c == b), through the
    shared step functions; returns the last step's mean loss on this rank."""
    ob = rs.optbatch
    warm = dataclasses.replace(ob, method="random" if rs.candidates > rs.train_batch_size else "full")
    rt = ob_step.SelectionRuntime.build(engine.module, warm, rs.sizes, prep.tokenizer.pad_token_id, lambda: None,
                                        None, job.rank)
    rt.group_by_length = job.run.group_by_length  # as launch/train.py deals its steps
    sampler = EpochSampler(len(prep.pool), seed=job.run.seed)
    engine.train()
    loss_sum, mine = 0.0, []
    for step in range(1, job.warmup_steps + 1):
        cand = [prep.pool[p] for p in sampler.draw(rs.candidates)]
        choice = ob_step.choose_batch(rt, engine, prep.encoded, cand, step, ob_step.new_timers())  # random: no scoring
        selected = [cand[p] for p in choice.positions.tolist()]
        mine, weights = ob_step.my_share(rt, *ob_step.deal(rt, prep.encoded, selected, choice.weights))
        loss_sum = ob_step.train_on(rt, engine, prep.encoded, mine, weights, step).loss_sum
    return loss_sum / max(len(mine), 1)


def _select_pool(rt: ob_step.SelectionRuntime, pool_id: int, scores: ob_step.Scores, ids: list, budget: int):
    """Rank 0: (positions kept, weights, info, stratum of each candidate or None) for one pool of the candidates
    `ids` (dataset indices), ranked by the run's signal.

    The last, partial pool may hold fewer valid candidates than strata: it is cut into as many as it has."""
    selector, n = rt.selector, len(ids)
    losses = scores.losses[:n]
    sketches = scores.sketches[:n] if scores.sketches is not None else None
    if budget == 0:
        return [], [], {}, [None] * n
    cfg = selector.config
    finite = torch.isfinite(losses)
    if sketches is not None:
        finite &= torch.isfinite(sketches).all(1)
    k = min(cfg.strata, int(finite.sum()))
    if cfg.method in ("optbatch", "ccs") and 0 < k < cfg.strata:
        selector = Selector(dataclasses.replace(cfg, strata=k))
    ctx = SignalContext(rt.reference, rt.store, rt.optbatch.seed, pool_id + 1, rt.groups, len(ids))
    signal = signal_values(rt.optbatch.signal, losses, sketches, ids, ctx)
    result = selector(pool_id + 1, Candidates(losses, sketches, signal, rt.groups_of(ids)), budget)
    strata = [int(s) if s >= 0 else None for s in result.strata.tolist()]
    return result.indices.tolist(), result.weights.tolist(), result.info, strata


def _score_pools(rt: ob_step.SelectionRuntime, engine, prep: Prepared, job: Job, times: dict):
    """Score every pool (collective) and select in each on rank 0: (per-example sidecar fields, per-pool info)."""
    ob, (c, b) = rt.optbatch, (rt.sizes.candidates, rt.sizes.train_batch_size)
    order = EpochSampler(len(prep.pool), seed=job.run.seed).permutation(0).tolist()
    pools = [order[s:s + c] for s in range(0, len(order), c)]
    weighted = ob.method == "infobatch" or (ob.method == "optbatch" and ob.reweight != "none")
    per_example: dict[int, dict] = {}  # example index -> sidecar fields (rank 0)
    pool_info = []
    progress = None
    if job.rank == 0:
        from tqdm import tqdm

        progress = tqdm(total=len(pools), desc="select", dynamic_ncols=True, mininterval=1.0)
    for pid, positions in enumerate(pools):
        n = len(positions)
        mine = padded_shard(positions, job.rank, job.world)  # ZeRO-3 forwards are collective: equal slices
        timers = ob_step.new_timers()
        scores = ob_step.score_and_gather(rt, engine, [prep.encoded[prep.pool[p]] for p in mine], timers)
        for key in ("curvature", "score_forward", "features", "gather"):
            times[key] += timers[key]
        if job.rank != 0:
            continue
        t0 = time.perf_counter()
        budget = b if n == c else round(n * (1.0 - ob.prune_ratio))
        kept, weights, info, strata = _select_pool(rt, pid, scores, [prep.pool[p] for p in positions], budget)
        times["select"] += time.perf_counter() - t0
        weight_of = dict(zip(kept, weights))
        for j, p in enumerate(positions):
            line = {"pool": pid, "loss": float(scores.losses[j]), "stratum": strata[j], "selected": j in weight_of}
            if weighted and j in weight_of:
                line["weight"] = round(float(weight_of[j]), 6)
            per_example[prep.pool[p]] = line
        pool_info.append({"pool": pid, "candidates": n, "budget": budget,
                          **{k: info[k] for k in ("quotas", "mean_loss_candidates", "mean_loss_selected")
                             if k in info}})
        progress.update(1)
    if progress is not None:
        progress.close()
    return per_example, pool_info


def select_dataset(job: Job, local_rank: int) -> dict | None:
    """The whole offline recipe (module docstring); returns the summary on rank 0, None elsewhere. Collective."""
    run = job.run
    times = dict.fromkeys(("setup", "warmup", "curvature", "score_forward", "features", "gather", "select",
                           "write"), 0.0)
    t0 = time.perf_counter()
    seed_everything(run.seed)
    prep = prepare_data_and_model(run, local_rank, job.output)
    if job.warmup_steps == 0:
        run = dataclasses.replace(run, max_steps=1)  # nothing is trained: the LR schedule is moot
    rs = resolve_here(run, job.world, num_train_samples=len(prep.pool))
    engine, _, _keep_alive, _ = build_engine(prep, rs)
    times["setup"] = time.perf_counter() - t0
    ob = rs.optbatch
    log0(f"optbatch_ds select | world {job.world} | model {prep.model_path} | {len(prep.pool)} samples | method "
         f"{ob.method} | prune {ob.prune_ratio} | b {rs.train_batch_size} of c {rs.candidates} per pool | "
         f"warm-up {job.warmup_steps} steps")
    warm_loss = None
    if job.warmup_steps:
        t0 = time.perf_counter()
        warm_loss = _warm_up(engine, prep, rs, job)
        times["warmup"] = time.perf_counter() - t0
        log0(f"warm-up | {job.warmup_steps} steps | last loss {warm_loss:.4f} | {times['warmup']:.1f}s")
    # every pool is scored at "step 0": the runtime reads Adam's curvature once (no training happens meanwhile);
    # ema's statistic grows pool by pool. The "curvature" key resolved on the model (LoRA: ema under auto)
    curvature = CurvaturePolicy.build(ob, engine.module, adam=lambda: curvature_inv_sqrt(engine, ob.eps))
    rt = ob_step.SelectionRuntime.build(engine.module, ob, rs.sizes, prep.tokenizer.pad_token_id, curvature, None,
                                        job.rank)
    rt.attach(len(prep.encoded), reference_losses(ob, prep.examples)[0], task_groups(e.task for e in prep.examples))
    per_example, pool_info = _score_pools(rt, engine, prep, job, times)
    summary = None
    if job.rank == 0:
        summary = _write_all(job, prep, rs, {"per_example": per_example, "pools": pool_info, "warmup_loss": warm_loss,
                                             "times": times})
        print(f"select | kept {summary['kept']} of {summary['records']} records "
              f"({summary['scored']} scored, {summary['skipped']} skipped as bad"
              + (f": {summary['skipped_by_problem']}" if summary["skipped"] else "")
              + f") -> {job.output}", file=sys.stderr, flush=True)
    comm.barrier()
    return summary


def _sidecar_lines(files, prep: Prepared, per_example: dict, data_format: str) -> tuple[list[str], list]:
    """One sidecar line per input record, in input order, and the (file, record) of every kept record."""
    matched = _match_examples(files, prep.examples, data_format)
    example_of = {loc: k for k, loc in enumerate(matched)}
    skipped_kinds: dict[str, list[str]] = {}
    for s in prep.report.skipped:
        skipped_kinds.setdefault(s["source"], []).append(s["kind"])
    lines, kept, index = [], [], 0
    for fi, (_, records) in enumerate(files):
        for ri, r in enumerate(records):
            k = example_of.get((fi, ri))
            line = {"index": index, "source": r.source}
            if k is not None and k in per_example:
                line.update(per_example[k])
                if line["selected"]:
                    kept.append((fi, ri))
            else:  # skipped as bad (unparseable, or no supervised token left): listed, never selected
                kinds = skipped_kinds.get(r.source) or ["skipped"]
                line.update(pool=None, loss=None, stratum=None, selected=False,
                            skipped=kinds.pop(0) if len(kinds) > 1 else kinds[0])
            lines.append(json.dumps(line))
            index += 1
    return lines, kept


def _write_all(job: Job, prep: Prepared, rs: Resolved, selection: dict) -> dict:
    """Rank 0: the kept records, the sidecar and the summary (module docstring); returns the summary."""
    t0 = time.perf_counter()
    times, pool_info, report, ob = selection["times"], selection["pools"], prep.report, rs.optbatch
    files = _raw_files(prep.train_spec)
    lines, kept = _sidecar_lines(files, prep, selection["per_example"], job.run.data_format)
    sidecar, summary_path = sidecar_paths(job.output)
    write_kept(files, kept, job.output)
    _write_atomic(sidecar, ("\n".join(lines) + "\n").encode("utf-8"))
    times["write"] = time.perf_counter() - t0
    c = rs.candidates
    full = [p for p in pool_info if p["candidates"] == c]
    last = pool_info[-1] if pool_info and pool_info[-1]["candidates"] != c else None
    summary = {
        "input": prep.train_spec, "output": job.output, "sidecar": sidecar, "model": prep.model_path,
        "records": len(lines), "scored": len(selection["per_example"]), "kept": len(kept),
        "skipped": report.count(), "skipped_by_problem": report.by_problem(),
        "events": dict(report.events), "skipped_records": report.skipped,
        "candidates_per_pool": c, "budget_per_pool": rs.train_batch_size, "full_pools": len(full),
        "last_pool": None if last is None else {"candidates": last["candidates"], "budget": last["budget"]},
        "method": ob.method, "prune_ratio": ob.prune_ratio, "optbatch": dataclasses.asdict(ob),
        "seed": job.run.seed, "warmup_steps": job.warmup_steps, "warmup_last_loss": selection["warmup_loss"],
        "world_size": job.world, "seconds": {k: round(v, 4) for k, v in times.items()}, "pools": pool_info,
    }
    _write_atomic(summary_path, (json.dumps(summary, indent=1, default=str) + "\n").encode("utf-8"))
    return summary


def main(argv=None) -> int:
    """launch/prune.py: parse the flags, start the process group, select, clean up."""
    run, output, warmup_steps = parse_args(argv)
    rank, world, local_rank = comm.init_distributed(run.collective_timeout)
    try:
        select_dataset(Job(run, os.path.abspath(output), warmup_steps, rank, world), local_rank)
    finally:
        comm.cleanup()
    return 0
