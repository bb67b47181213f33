"""The benchmark's plan: which runs a grid holds (methods x prune ratios x seeds, plus ablations), each
validated the way the trainer will resolve it, with a time estimate.

An ablation is `method:key=value[,key=value]` applied to the "optbatch" section (e.g. `optbatch:strata=1`);
it becomes a derived DeepSpeed JSON in the output folder, because the section has no flags.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field

from optbatch_ds.bench.io import fmt_value
from optbatch_ds.config import METHODS, OptBatchConfig, RunConfig, planned_steps, resolve
from optbatch_ds.errors import ConfigError, nearest_name

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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


@dataclass
class Variant:
    """A method, optionally with overrides of its "optbatch" section (an ablation)."""

    method: str
    overrides: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        if not self.overrides:
            return self.method
        return self.method + ":" + ",".join(f"{k}={fmt_value(v)}" for k, v in self.overrides.items())

    @property
    def slug(self) -> str:
        """Filesystem-safe label: optbatch:strata=1 -> optbatch__strata-1."""
        if not self.overrides:
            return self.method
        parts = [f"{k}-{fmt_value(v)}" for k, v in self.overrides.items()]
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
        raise ConfigError(f"--methods: '{method}' is not a method{nearest_name(method, METHODS)}")
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


def abs_if_local(path: str | None) -> str | None:
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
                OptBatchConfig.from_dict(section, pretrained=args.model is not None)
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


def fmt_s(s: float) -> str:
    """Seconds as 1h02m, 3m05s or 42s; ? for NaN."""
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
              f"{fmt_s(r.est_s):>7}  {status}")
    how = "calibrated on finished runs" if scale != 1.0 else \
        f"assumes {1 / FULL_STEP_S:.0f} full-data steps/s and {STARTUP_S:.0f} s start-up (demo model, 2 CPU ranks)"
    jobs = f", {args.jobs} at a time" if args.jobs > 1 else ""
    print(f"estimated time for the runs to do: {fmt_s(todo / args.jobs)} ({how}{jobs})", flush=True)
