"""The benchmark grid behind launch/bench.py: plan -> run -> collect -> tabulate -> plot.

Every run is one ordinary training run (launch/train.py through the deepspeed launcher), so the
benchmark measures exactly what a user gets. Methods x prune ratios x seeds, plus ablations of the
"optbatch" section written as `method:key=value[,key=value]` (e.g. `optbatch:strata=1`); an
ablation becomes a derived DeepSpeed JSON in the output folder, because the section has no flags.

Layout of --out:
    runs/<method>[__<key>-<value>]_a<ratio>_s<seed>/   one training run (its log.txt, bench_status.json)
    ds_configs/<variant>.json                          derived configs of the ablations
    results.csv, results.json, results.md, *.png       the comparison
A run is finished when its eval.json exists; finished runs are skipped on the next invocation,
unfinished or failed ones are started again from scratch.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from dataclasses import asdict, dataclass, field

from optbatch_ds.bench_report import (_fmt_value, _read_json, _tail, _write_json, collect_run,
                                      full_curve, plateau_note, report)
from optbatch_ds.config import (METHODS, ConfigError, OptBatchConfig, RunConfig, _nearest, load_json_config,
                                planned_steps, resolve)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_SCRIPT = os.path.join(ROOT, "launch", "train.py")
DEFAULT_METHODS = ",".join(METHODS)
DEFAULT_RATIOS = "0.2,0.3,0.5,0.7"
# On the demo data with the built-in model, full-data training's held-out loss bottoms out at 8-10 epochs
# and then rises (QA overfits), whatever the schedule's length (BENCHMARKS.md): the budget to compare at.
DEMO_EPOCHS = 10.0
ABLATIONS = ("optbatch:strata=1", "optbatch:within=random", "optbatch:quotas=uniform",
             "optbatch:feature=grad_raw", "optbatch:feature=hidden")
# Plan estimate before any run has finished: the default model on the demo data does ~10 full-data
# steps/s on 2 CPU ranks, start-up ~10 s. Refined from the runs that finish (bench_status.json).
FULL_STEP_S, STARTUP_S, EVAL_S = 0.1, 10.0, 5.0
FAILED_TAIL_LINES = 30


# ---------------------------------------------------------------------------- plan

@dataclass
class Variant:
    """A method, optionally with overrides of its "optbatch" section (an ablation)."""

    method: str
    overrides: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        if not self.overrides:
            return self.method
        return self.method + ":" + ",".join(f"{k}={_fmt_value(v)}" for k, v in self.overrides.items())

    @property
    def slug(self) -> str:
        """Filesystem-safe label: optbatch:strata=1 -> optbatch__strata-1."""
        if not self.overrides:
            return self.method
        parts = [f"{k}-{_fmt_value(v)}" for k, v in self.overrides.items()]
        return re.sub(r"[^A-Za-z0-9_.+-]", "_", self.method + "__" + "__".join(parts))


@dataclass
class RunSpec:
    variant: Variant
    prune_ratio: float
    seed: int
    name: str
    dir: str
    deepspeed: str                  # the JSON this run is launched with
    candidates: int                 # c per step (all ranks)
    train_batch_size: int           # b per step (all ranks)
    steps: int                      # planned optimizer steps (0: unknown)
    steps_per_epoch: int            # pool // c (0: unknown)
    eval_every: int
    est_s: float = 0.0

    @property
    def label(self) -> str:
        return self.variant.label


def _parse_value(text: str):
    """'1' -> 1, '0.5' -> 0.5, 'true' -> True, anything else stays a string ('random', 'inf')."""
    try:
        v = json.loads(text)
    except json.JSONDecodeError:
        return text
    return v if isinstance(v, (int, float, bool)) else text


def parse_variant(spec: str) -> Variant:
    """`method` or `method:key=value[,key=value]`; checks the method name and the key=value syntax."""
    spec = spec.strip()
    method, _, rest = spec.partition(":")
    method = method.strip()
    if method not in METHODS:
        raise ConfigError(f"--methods: '{method}' is not a method{_nearest(method, METHODS)}")
    overrides: dict = {}
    if rest:
        for item in rest.split(","):
            key, eq, value = (s.strip() for s in item.partition("="))
            if not eq or not key or not value:
                raise ConfigError(f"--methods {spec}: '{item}' is not key=value "
                                  f"(e.g. optbatch:strata=1 or optbatch:within=random,quotas=uniform)")
            if key in ("method", "prune_ratio"):
                raise ConfigError(f"--methods {spec}: set '{key}' with --methods / --ratios, not as an ablation key")
            overrides[key] = _parse_value(value)
    return Variant(method, overrides)


def parse_variants(methods: str, ablations: bool) -> list[tuple[Variant, bool]]:
    """(variant, is_ablation_shortcut) in order, without duplicates."""
    out: list[tuple[Variant, bool]] = []
    seen = set()
    specs = [(s, False) for s in methods.split(",") if s.strip()]
    # "optbatch:within=random,quotas=uniform" splits on the comma too: glue key=value pieces back on
    merged: list[tuple[str, bool]] = []
    for s, flag in specs:
        if merged and "=" in s and ":" not in s:
            merged[-1] = (merged[-1][0] + "," + s, flag)
        else:
            merged.append((s, flag))
    merged += [(s, True) for s in (ABLATIONS if ablations else ())]
    for s, flag in merged:
        v = parse_variant(s)
        if v.label not in seen:
            seen.add(v.label)
            out.append((v, flag))
    if not out:
        raise ConfigError("--methods is empty; e.g. --methods full,random,optbatch")
    return out


def parse_ratios(text: str) -> list[float]:
    try:
        ratios = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--ratios {text}: expected comma-separated numbers in (0, 1), e.g. 0.2,0.3,0.5") from None
    for r in ratios:
        if not 0.0 < r < 1.0:
            raise ConfigError(f"--ratios: {r} is outside (0, 1); 0.3 trains on 70% of each candidate pool")
    if not ratios:
        raise ConfigError("--ratios is empty")
    return sorted(set(ratios))


def _abs_if_local(path: str | None) -> str | None:
    """Local paths become absolute (runs start in the repo root); hub names pass through."""
    return os.path.abspath(path) if path is not None and os.path.exists(path) else path


def count_train_samples(args) -> int | None:
    """Training records of the data the runs will use (an estimate of the sampler's pool), or None."""
    from optbatch_ds.data import SkipReport, load_examples

    try:
        if args.data is None:
            from optbatch_ds.data.demo import make_demo_data

            with tempfile.TemporaryDirectory() as tmp:  # same generator and seed as the trainer's demo set
                make_demo_data(tmp, seed=0)
                return len(load_examples(os.path.join(tmp, "train.jsonl")))
        if os.path.exists(args.data):
            return len(load_examples(args.data, on_bad_record="skip", report=SkipReport()))
    except Exception as exc:  # the runs themselves report bad data properly; the plan only loses its estimate
        print(f"note: could not count the training samples ({exc}); the plan has no step estimate", flush=True)
    return None


def derived_config(base: dict, variant: Variant) -> dict:
    ds = copy.deepcopy(base)
    section = dict(ds.get("optbatch") or {})
    section["method"] = variant.method
    section.update(variant.overrides)
    ds["optbatch"] = section
    return ds


def make_plan(args, variants, ratios: list[float], base: dict, n_train: int | None) -> list[RunSpec]:
    """Every run of the grid, each validated the way the trainer will resolve it. Raises ConfigError."""
    runs_dir = os.path.join(args.out, "runs")
    plan = []
    for variant, is_shortcut in variants:
        ds = derived_config(base, variant) if variant.overrides else base
        ds_path = (os.path.join(args.out, "ds_configs", variant.slug + ".json") if variant.overrides
                   else os.path.abspath(args.deepspeed))
        v_ratios = [0.0] if variant.method == "full" else ([args.ablation_ratio] if is_shortcut else ratios)
        for ratio in v_ratios:
            section = {**(ds.get("optbatch") or {}), "method": variant.method, "prune_ratio": ratio}
            try:
                OptBatchConfig.from_dict(section)
                run = RunConfig(deepspeed=ds_path, model=args.model, data=args.data, eval_data=args.eval_data,
                                epochs=args.epochs, max_steps=args.max_steps, method=variant.method,
                                prune_ratio=ratio)
                rs = resolve(run, args.nproc, raw=ds, num_train_samples=n_train)
                steps = planned_steps(run, n_train, rs.candidates)
            except ConfigError as exc:
                raise ConfigError(f"--methods {variant.label} at prune ratio {ratio}: {exc}") from None
            per_epoch = n_train // rs.candidates if n_train else 0
            eval_every = args.eval_every if args.eval_every >= 0 else (math.ceil(steps / 4) if steps else 0)
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                name = f"{variant.slug}_a{ratio:.2f}_s{seed}"
                plan.append(RunSpec(variant, ratio, seed, name, os.path.join(runs_dir, name), ds_path,
                                    rs.candidates, rs.train_batch_size, steps, per_epoch, eval_every))
    return plan


def estimate_seconds(run: RunSpec, scale: float = 1.0) -> float:
    """Start-up + steps x (train b + score c) + evaluations, in units of a full-data step."""
    needs_scores = run.variant.method not in ("full", "random")
    step_cost = 1.0 + (run.candidates / (3.0 * run.train_batch_size) if needs_scores else 0.0)
    evals = 1 + (run.steps // run.eval_every if run.eval_every else 0)
    return scale * (STARTUP_S + run.steps * FULL_STEP_S * step_cost + evals * EVAL_S)


def _fmt_s(s: float) -> str:
    if s != s:
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


def print_plan(plan: list[RunSpec], scale: float, args, n_train: int | None) -> None:
    budget = f"--max-steps {args.max_steps}" if args.max_steps > 0 else f"--epochs {args.epochs:g}"
    print(f"bench | {len(plan)} runs | {args.nproc} rank(s) | {budget} | data {args.data or 'demo'} "
          f"({n_train if n_train else '?'} train samples) | model {args.model or 'built-in small Llama'} | out {args.out}")
    head = f"{'#':>3}  {'run':<44} {'method':<34} {'ratio':>5} {'seed':>4} {'b/c':>7} {'steps':>6} {'eval@':>5} {'est':>7}  status"
    print(head)
    print("-" * len(head))
    todo = 0.0
    for i, r in enumerate(plan, 1):
        done = os.path.exists(os.path.join(r.dir, "eval.json"))
        status = "done (skip)" if done else ("retry" if os.path.isdir(r.dir) else "todo")
        todo += 0.0 if done else r.est_s
        print(f"{i:>3}  {r.name:<44} {r.label:<34} {r.prune_ratio:>5.2f} {r.seed:>4} "
              f"{f'{r.train_batch_size}/{r.candidates}':>7} {r.steps or '?':>6} {r.eval_every or '-':>5} "
              f"{_fmt_s(r.est_s):>7}  {status}")
    how = "calibrated on finished runs" if scale != 1.0 else \
        f"assumes {1 / FULL_STEP_S:.0f} full-data steps/s and {STARTUP_S:.0f} s start-up (demo model, 2 CPU ranks)"
    jobs = f", {args.jobs} at a time" if args.jobs > 1 else ""
    print(f"estimated time for the runs to do: {_fmt_s(todo / args.jobs)} ({how}{jobs})", flush=True)


# ---------------------------------------------------------------------------- run

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    return [*launcher_cmd, "--num_gpus", str(args.nproc), "--master_port", str(_free_port()),
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
        # PYTHONSAFEPATH: launch/ is not put first on the runs' sys.path, where launch/select.py would shadow
        # the standard library's `select` (train.py adds the repository root itself)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONSAFEPATH": "1"}
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
        record["log_tail"] = _tail(log_path, FAILED_TAIL_LINES)
        with open(os.path.join(run.dir, "failure.txt"), "w") as f:
            f.write(f"{status} (return code {rc}) after {elapsed:.0f} s\n$ {shlex.join(cmd)}\n\n")
            f.write("\n".join(record["log_tail"]) + "\n")
    _write_json(os.path.join(run.dir, "bench_status.json"), record)
    return record


def _calibration(plan: list[RunSpec]) -> float:
    """Measured / estimated time over the runs that finished (in this or an earlier invocation)."""
    actual = est = 0.0
    for r in plan:
        st = _read_json(os.path.join(r.dir, "bench_status.json"))
        if st and st.get("status") == "ok" and st.get("est_s"):
            actual += st["elapsed_s"]
            est += st["est_s"]
    return actual / est if est > 0 else 1.0


def _remove_checkpoints(run: RunSpec) -> None:
    """The comparison needs metrics and evals, not weights; ZeRO checkpoints of real models are large."""
    shutil.rmtree(os.path.join(run.dir, "checkpoints"), ignore_errors=True)


# ---------------------------------------------------------------------------- command line

class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(message)


def build_arg_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="launch/bench.py", allow_abbrev=False,
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
        raise ConfigError(f"unknown flag '{first}'{_nearest(first, parser._option_string_actions)} "
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
    args.data, args.eval_data, args.model = map(_abs_if_local, (args.data, args.eval_data, args.model))
    return args, extra


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parse_args(argv)
    variants = parse_variants(args.methods, args.ablations)
    ratios = parse_ratios(args.ratios)
    if not 0.0 < args.ablation_ratio < 1.0:
        raise ConfigError(f"--ablation-ratio {args.ablation_ratio} is outside (0, 1)")
    base = load_json_config(args.deepspeed)
    n_train = count_train_samples(args)
    plan = make_plan(args, variants, ratios, base, n_train)  # every run validated before any starts
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

    os.makedirs(args.out, exist_ok=True)
    for variant, _ in variants:
        if variant.overrides:
            path = os.path.join(args.out, "ds_configs", variant.slug + ".json")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                json.dump(derived_config(base, variant), f, indent=2)
    _write_json(os.path.join(args.out, "plan.json"),
                {"argv": argv, "runs": [{**asdict(r), "variant": r.label} for r in plan]})

    todo = [r for r in plan if not os.path.exists(os.path.join(r.dir, "eval.json"))]
    print(f"\n{len(plan) - len(todo)} finished run(s) skipped, {len(todo)} to run", flush=True)
    failed = []
    t_start = time.time()
    threads = threads_per_rank(args.nproc, args.jobs)
    if args.jobs > 1:
        print(f"{args.jobs} runs at a time, {args.nproc} rank(s) x {threads} thread(s) each "
              "(wall times of concurrent runs are comparable with each other, not with a quiet machine)", flush=True)

    def finished(run: RunSpec, st: dict, i: int) -> None:
        if st["status"] == "ok" and not args.keep_checkpoints:
            _remove_checkpoints(run)
        row = collect_run(run, set())
        done_s = time.time() - t_start
        scale = _calibration(plan)
        left = [r for r in todo if not os.path.exists(os.path.join(r.dir, "bench_status.json"))]
        eta = sum(estimate_seconds(r, scale) for r in left) / args.jobs
        if st["status"] == "ok":
            print(f"[{i}/{len(todo)}] {run.name} | ok | loss {row['heldout_loss']:.4f} | EM {row['em_mean']:.1f} | "
                  f"BLEU-4 {row['bleu4_mean']:.1f} | trained {row['samples_trained']} | FLOPs {row['flops']:.3g} | "
                  f"train {row['wall_s']:.1f}s of {st['elapsed_s']:.0f}s | elapsed {_fmt_s(done_s)} | ETA {_fmt_s(eta)}",
                  flush=True)
        else:
            failed.append(run.name)
            rc_note = "" if st["status"] == "timeout" else f" (rc {st['returncode']})"
            print(f"[{i}/{len(todo)}] {run.name} | {st['status'].upper()}{rc_note} after "
                  f"{st['elapsed_s']:.0f}s | see {os.path.join(run.dir, 'failure.txt')} | ETA {_fmt_s(eta)}", flush=True)
            tail = [l for l in st.get("log_tail", []) if l.strip()]
            # the trainer's own message ("error: ...", an exception) beats the launcher's kill notices
            cause = [l for l in tail if re.match(r"\s*(error\b|\w*(Error|Exception)\b)", l)] or tail
            for line in cause[-3:]:
                print("      " + line.strip()[:200], flush=True)

    queue = list(todo)
    n_done = 0
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
                    finished(in_flight.pop(fut), fut.result(), n_done)
        except KeyboardInterrupt:
            stop_all()
            names = ", ".join(r.name for r in in_flight.values())
            print(f"\ninterrupted during {names} (stopped); rerun the same command to resume the grid", flush=True)
            return 130
    rows, summary = report(plan, args, argv)
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
