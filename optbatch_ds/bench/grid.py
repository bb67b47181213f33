"""The benchmark grid behind launch/bench.py: plan -> run -> collect -> tabulate -> plot.

Every run is one ordinary training run (launch/train.py through the deepspeed launcher), so the
benchmark measures exactly what a user gets.

Layout of --out:
    runs/<method>[__<key>-<value>]_a<ratio>_s<seed>/   one training run (its log.txt, bench_status.json)
    ds_configs/<variant>.json                          derived configs of the ablations
    results.csv, results.json, results.md, *.png       the comparison
A run is finished when its eval.json exists; finished runs are skipped on the next invocation,
unfinished or failed ones are started again from scratch.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures
from dataclasses import asdict

from optbatch_ds.bench.io import read_json, tail, write_json
from optbatch_ds.bench.plan import (ABLATIONS, DEFAULT_METHODS, DEFAULT_RATIOS, DEMO_EPOCHS, ROOT, TRAIN_SCRIPT,
                                    RunSpec, abs_if_local, count_train_samples, derived_config, estimate_seconds, fmt_s, make_plan,
                                    parse_ratios, parse_variants, print_plan)
from optbatch_ds.bench.report import collect_run, full_curve, plateau_note, report
from optbatch_ds.comm import free_port
from optbatch_ds.config import Parser, load_json_config
from optbatch_ds.errors import ConfigError, nearest_name

FAILED_TAIL_LINES = 30


# ---------------------------------------------------------------------------- run

def build_command(run: RunSpec, args, extra: list[str]) -> list[str]:
    train_args = ["--deepspeed", run.deepspeed, "--method", run.variant.method, "--seed", str(run.seed),
                  "--output-dir", run.dir, "--no-export"]
    if run.variant.method != "full":
        train_args += ["--prune-ratio", repr(run.prune_ratio)]
    if args.max_steps > 0:
        train_args += ["--max-steps", str(args.max_steps)]
    else:
        train_args += ["--epochs", f"{args.epochs:g}"]
    for flag, value in (("--model", args.model), ("--data", args.data), ("--eval-data", args.eval_data)):
        if value is not None:
            train_args += [flag, value]
    if run.eval_every:
        train_args += ["--eval-every", str(run.eval_every)]
    if args.eval_samples_per_task is not None:
        train_args += ["--eval-samples-per-task", str(args.eval_samples_per_task)]
    train_args += extra
    if args.nproc == 1 and not args.launcher_args:
        return [sys.executable, TRAIN_SCRIPT, *train_args]
    launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or shutil.which("deepspeed")
    launcher_cmd = [launcher] if launcher else [sys.executable, "-m", "deepspeed.launcher.runner"]
    # a free port per run: the default 29500 may be held by another job on this machine
    return [*launcher_cmd, "--num_gpus", str(args.nproc), "--master_port", str(free_port()),
            *shlex.split(args.launcher_args), TRAIN_SCRIPT, *train_args]


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the run's process group (the trainer checkpoints and leaves), SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


_RUNNING: set = set()  # Popen objects of the runs in flight (stopped together on Ctrl-C)
_RUNNING_LOCK = threading.Lock()


def threads_per_rank(run_ranks: int, jobs: int) -> int:
    """Like torchrun: ranks sharing the CPU cores must not each spawn a thread per core."""
    return max(1, (os.cpu_count() or 1) // max(1, run_ranks * jobs))


def stop_all() -> None:
    with _RUNNING_LOCK:
        procs = list(_RUNNING)
    for proc in procs:
        _stop(proc)


def execute(run: RunSpec, cmd: list[str], timeout: float, threads: int = 1) -> dict:
    """Run one training run into run.dir (from scratch); returns and writes its bench_status.json.

    Safe to call from several threads at once (--jobs): each run has its own directory and process group."""
    if os.path.isdir(run.dir):
        shutil.rmtree(run.dir)  # an unfinished attempt: its appended eval_history would mix with the new one
    os.makedirs(run.dir)
    log_path = os.path.join(run.dir, "log.txt")
    t0 = time.time()
    status, rc = "failed", None
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(cmd) + "\n\n")
        log.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.setdefault("OMP_NUM_THREADS", str(threads))
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        with _RUNNING_LOCK:
            _RUNNING.add(proc)
        try:
            rc = proc.wait(timeout=timeout or None)
        except subprocess.TimeoutExpired:
            _stop(proc)
            status = "timeout"
        except KeyboardInterrupt:
            _stop(proc)
            raise
        finally:
            with _RUNNING_LOCK:
                _RUNNING.discard(proc)
    elapsed = time.time() - t0
    if status != "timeout":
        status = "ok" if rc == 0 and os.path.exists(os.path.join(run.dir, "eval.json")) else "failed"
    record = {"status": status, "returncode": rc, "elapsed_s": round(elapsed, 3), "est_s": round(run.est_s, 3),
              "command": shlex.join(cmd), "threads_per_rank": threads, "started_unix": round(t0, 3),
              "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    if status != "ok":
        record["log_tail"] = tail(log_path, FAILED_TAIL_LINES)
        with open(os.path.join(run.dir, "failure.txt"), "w") as f:
            f.write(f"{status} (return code {rc}) after {elapsed:.0f} s\n$ {shlex.join(cmd)}\n\n")
            f.write("\n".join(record["log_tail"]) + "\n")
    write_json(os.path.join(run.dir, "bench_status.json"), record)
    return record


def _calibration(plan: list[RunSpec]) -> float:
    """Measured / estimated time over the runs that finished (in this or an earlier invocation)."""
    actual = est = 0.0
    for r in plan:
        st = read_json(os.path.join(r.dir, "bench_status.json"))
        if st and st.get("status") == "ok" and st.get("est_s"):
            actual += st["elapsed_s"]
            est += st["est_s"]
    return actual / est if est > 0 else 1.0


def _remove_checkpoints(run: RunSpec) -> None:
    """The comparison needs metrics and evals, not weights; ZeRO checkpoints of real models are large."""
    shutil.rmtree(os.path.join(run.dir, "checkpoints"), ignore_errors=True)


# ---------------------------------------------------------------------------- command line

def build_arg_parser() -> argparse.ArgumentParser:
    p = Parser(prog="launch/bench.py", allow_abbrev=False,
                description="Benchmark grid: methods x prune ratios x seeds through the real trainer and launcher. "
                            "Arguments after `--` go to launch/train.py unchanged.")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="Comma-separated methods; an ablation is method:key=value[,key=value] applied to the "
                        f"\"optbatch\" section (e.g. optbatch:strata=1). Default: {DEFAULT_METHODS}.")
    p.add_argument("--ratios", default=DEFAULT_RATIOS, help=f"Prune ratios (full ignores them). Default: {DEFAULT_RATIOS}.")
    p.add_argument("--seeds", type=int, default=3, help="Seeds per cell: first-seed .. first-seed + seeds - 1.")
    p.add_argument("--first-seed", type=int, default=0, help="The first seed.")
    p.add_argument("--ablations", action="store_true",
                   help="Add the OptBatch ablations " + ", ".join(ABLATIONS) + " at --ablation-ratio.")
    p.add_argument("--ablation-ratio", type=float, default=0.3, help="Prune ratio of the --ablations runs.")
    p.add_argument("--data", default=None, help="Training data (as train.py --data); default: demo set.")
    p.add_argument("--eval-data", default=None, help="Held-out data (required with --data).")
    p.add_argument("--model", default=None, help="Model (as train.py --model); default: built-in small Llama.")
    p.add_argument("--deepspeed", default="ds_configs/zero3.json", help="Base DeepSpeed JSON.")
    p.add_argument("--nproc", "--num-gpus", dest="nproc", type=int, default=2,
                   help="Ranks per run (deepspeed --num_gpus); 1 runs `python launch/train.py` without the launcher.")
    p.add_argument("--jobs", type=int, default=1,
                   help="Runs at a time (each gets cpu_count / (nproc x jobs) threads per rank); e.g. --nproc 1 "
                        "--jobs 2 --deepspeed ds_configs/bench_1rank.json on a 2-core machine.")
    p.add_argument("--launcher-args", default="", help="Extra deepspeed launcher arguments, e.g. '--hostfile hosts'.")
    p.add_argument("--epochs", type=float, default=None,
                   help=f"Epoch budget of every run; default {DEMO_EPOCHS:g} on the demo data (where full-data training's "
                        "held-out loss stops improving, BENCHMARKS.md), 3 otherwise. Check heldout_vs_epoch.png.")
    p.add_argument("--max-steps", type=int, default=-1, help="Step budget instead of epochs (-1: use --epochs).")
    p.add_argument("--eval-every", type=int, default=-1,
                   help="Evaluate every N steps in every run (-1: 4 evaluations per run; 0: only at the end).")
    p.add_argument("--eval-samples-per-task", type=int, default=None,
                   help="Cap on held-out samples per task for generation metrics (train.py's default: all).")
    p.add_argument("--out", default="bench_out", help="Output folder (resumable).")
    p.add_argument("--dry-run", action="store_true", help="Print the plan and exit.")
    p.add_argument("--report-only", action="store_true",
                   help="Write results.* and plots over the runs of this plan that have finished; run nothing.")
    p.add_argument("--timeout-per-run", type=float, default=0, help="Seconds before a run is stopped (0: none).")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="Keep each finished run's checkpoints/ (deleted by default: the benchmark only needs metrics).")
    return p


def parse_args(argv: list[str]):
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    else:
        extra = []
    parser = build_arg_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        first = unknown[0].split("=")[0]
        raise ConfigError(f"unknown flag '{first}'{nearest_name(first, parser._option_string_actions)} "
                          "(flags for train.py go after `--`)")
    if args.seeds < 1:
        raise ConfigError(f"--seeds {args.seeds}: need at least 1")
    if args.nproc < 1:
        raise ConfigError(f"--nproc {args.nproc}: need at least 1 rank")
    if args.jobs < 1:
        raise ConfigError(f"--jobs {args.jobs}: need at least 1")
    if args.epochs is None:
        args.epochs = DEMO_EPOCHS if args.data is None else 3.0
    if args.max_steps <= 0 and args.epochs <= 0:
        raise ConfigError("--epochs must be > 0 (or give --max-steps)")
    if args.data is not None and args.eval_data is None:
        raise ConfigError("--data without --eval-data: the benchmark compares held-out quality; give --eval-data")
    args.out = os.path.abspath(args.out)
    args.data, args.eval_data, args.model = map(abs_if_local, (args.data, args.eval_data, args.model))
    return args, extra


def _announce(run: RunSpec, st: dict, i: int, n: int, eta: float, elapsed: float) -> None:
    """One line per finished run: its quality and cost, or why it failed (the trainer's own message first)."""
    if st["status"] == "ok":
        row = collect_run(run, set())
        print(f"[{i}/{n}] {run.name} | ok | loss {row['heldout_loss']:.4f} | EM {row['em_mean']:.1f} | "
              f"BLEU-4 {row['bleu4_mean']:.1f} | trained {row['samples_trained']} | FLOPs {row['flops']:.3g} | "
              f"train {row['wall_s']:.1f}s of {st['elapsed_s']:.0f}s | elapsed {fmt_s(elapsed)} | ETA {fmt_s(eta)}",
              flush=True)
        return
    rc_note = "" if st["status"] == "timeout" else f" (rc {st['returncode']})"
    print(f"[{i}/{n}] {run.name} | {st['status'].upper()}{rc_note} after "
          f"{st['elapsed_s']:.0f}s | see {os.path.join(run.dir, 'failure.txt')} | ETA {fmt_s(eta)}", flush=True)
    lines = [l for l in st.get("log_tail", []) if l.strip()]
    # the trainer's own message ("error: ...", an exception) beats the launcher's kill notices
    cause = [l for l in lines if re.match(r"\s*(error\b|\w*(Error|Exception)\b)", l)] or lines
    for line in cause[-3:]:
        print("      " + line.strip()[:200], flush=True)


def run_grid(plan: list[RunSpec], todo: list[RunSpec], args, extra: list[str]) -> bool:
    """Run `todo`, args.jobs at a time; False when interrupted (every run in flight is stopped)."""
    t_start = time.time()
    threads = threads_per_rank(args.nproc, args.jobs)
    if args.jobs > 1:
        print(f"{args.jobs} runs at a time, {args.nproc} rank(s) x {threads} thread(s) each "
              "(wall times of concurrent runs are comparable with each other, not with a quiet machine)", flush=True)
    queue, n_done = list(todo), 0
    with futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        in_flight = {}
        try:
            while queue or in_flight:
                while queue and len(in_flight) < args.jobs:
                    run = queue.pop(0)
                    in_flight[pool.submit(execute, run, build_command(run, args, extra), args.timeout_per_run,
                                          threads)] = run
                done, _ = futures.wait(in_flight, return_when=futures.FIRST_COMPLETED)
                for fut in done:
                    n_done += 1
                    run, st = in_flight.pop(fut), fut.result()
                    if st["status"] == "ok" and not args.keep_checkpoints:
                        _remove_checkpoints(run)
                    left = [r for r in todo if not os.path.exists(os.path.join(r.dir, "bench_status.json"))]
                    eta = sum(estimate_seconds(r, _calibration(plan)) for r in left) / args.jobs
                    _announce(run, st, n_done, len(todo), eta, time.time() - t_start)
        except KeyboardInterrupt:
            stop_all()
            names = ", ".join(r.name for r in in_flight.values())
            print(f"\ninterrupted during {names} (stopped); rerun the same command to resume the grid", flush=True)
            return False
    return True


def _write_plan_files(plan: list[RunSpec], variants, base: dict, args, argv: list[str]) -> None:
    """The derived configs of the ablations and plan.json, in --out."""
    os.makedirs(args.out, exist_ok=True)
    for variant, _ in variants:
        if variant.overrides:
            path = os.path.join(args.out, "ds_configs", variant.slug + ".json")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                json.dump(derived_config(base, variant), f, indent=2)
    write_json(os.path.join(args.out, "plan.json"),
               {"argv": argv, "runs": [{**asdict(r), "variant": r.label} for r in plan]})


def main(argv=None) -> int:
    """launch/bench.py: plan (every run validated first), run what is not finished, report."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parse_args(argv)
    variants = parse_variants(args.methods, args.ablations)
    ratios = parse_ratios(args.ratios)
    if not 0.0 < args.ablation_ratio < 1.0:
        raise ConfigError(f"--ablation-ratio {args.ablation_ratio} is outside (0, 1)")
    base = load_json_config(args.deepspeed)
    n_train = count_train_samples(args)
    plan = make_plan(args, variants, ratios, base, n_train)
    scale = _calibration(plan)
    for r in plan:
        r.est_s = estimate_seconds(r, scale)
    print_plan(plan, scale, args, n_train)
    if args.dry_run:
        return 0
    if args.report_only:  # tabulate what has finished, run nothing (grids run in pieces, reported together)
        done = [r for r in plan if os.path.exists(os.path.join(r.dir, "eval.json"))]
        if not done:
            raise ConfigError(f"--report-only: no finished run of this plan under {args.out}/runs")
        report(done, args, argv)
        print(f"\nbench | report over {len(done)} finished of {len(plan)} planned runs in {args.out}/results.md",
              flush=True)
        return 0
    _write_plan_files(plan, variants, base, args, argv)
    todo = [r for r in plan if not os.path.exists(os.path.join(r.dir, "eval.json"))]
    print(f"\n{len(plan) - len(todo)} finished run(s) skipped, {len(todo)} to run", flush=True)
    if not run_grid(plan, todo, args, extra):
        return 130
    rows, _ = report(plan, args, argv)
    bad = [r["run"] for r in rows if r["status"] != "ok"]
    print(f"\nbench | {len(rows) - len(bad)}/{len(rows)} runs ok | results in {args.out}/results.md, results.csv, "
          f"results.json, quality_vs_ratio.png, quality_vs_time.png, heldout_vs_epoch.png", flush=True)
    note = plateau_note(full_curve(rows))
    if note:
        print(note, flush=True)
    if bad:
        print("failed: " + ", ".join(bad) + " (each run dir holds failure.txt with the last "
              f"{FAILED_TAIL_LINES} log lines; rerun the same command to retry them)", flush=True)
        return 1
    return 0
