"""Epoch cost of OptBatch against full-data training, next to the cost model of DESIGN §3 (launch/bench_epoch.py).

Each configuration (full, and every --methods variant at every --ratios) is one real run (`deepspeed
launch/train.py ...`); the epoch time is the sum of the per-step times in metrics.jsonl (start-up, evaluation
and export excluded), so the ratios compare steps only. With --trace-warnings, ZeRO-3's parameter-trace
invalidations are logged and counted per run (each one drops its parameter prefetching until a new trace is
recorded). Ideal ratio with F_b = 2 F_f: (1 + 3 (1 - alpha)) / 3. Prints a markdown table and writes
`epoch_cost.json`; machine noise is large on shared CPUs, so compare ratios within one invocation.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from optbatch_ds.bench.plan import ROOT as REPO
from optbatch_ds.step import TIME_PARTS as PARTS

MODEL_SIZES = {
    "small": {},  # the built-in default
    "gpu": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                num_key_value_heads=16, max_position_embeddings=1024),
}


def ideal_ratio(alpha: float) -> float:
    """DESIGN §3: cost of an OptBatch epoch over a full-data one, F_b = 2 F_f, selection free."""
    return (1 + 3 * (1 - alpha)) / 3


def _config(args, spec: str) -> tuple[str, str, float]:
    """(method, DeepSpeed JSON path, prune ratio) of a variant spec ("full", "optbatch:preset=paper,scoring=stale"):
    the base JSON with the variant's "optbatch" keys and, with --trace-warnings, ZeRO-3's trace-cache warnings on."""
    from optbatch_ds.bench.plan import derived_config, parse_variant
    from optbatch_ds.config import load_json_config

    variant = parse_variant(spec)
    ds = derived_config(load_json_config(args.deepspeed), variant)
    if args.trace_warnings:
        ds.setdefault("zero_optimization", {})["log_trace_cache_warnings"] = True
    path = os.path.join(args.out, "configs", variant.slug + ".json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(ds, f, indent=2)
    return variant.method, path, variant.slug


def run_one(args, spec: str, ratio: float, model: str | None) -> dict:
    """One timed run of the variant `spec` at prune ratio `ratio` (ignored for full)."""
    method, config, slug = _config(args, spec)
    name = slug if method == "full" else f"{slug}_a{ratio}"
    out = os.path.join(args.out, name)
    cmd = ([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.nproc),
            "--master_port", str(args.port)] if args.nproc > 1 else [sys.executable])
    cmd += ["launch/train.py", "--deepspeed", config, "--output-dir", out,
            "--epochs", str(args.epochs), "--log-every", "0", "--no-export", "--eval-samples-per-task", "1",
            "--eval-max-new-tokens", "1", "--seed", str(args.seed)]
    if method != "full":
        cmd += ["--prune-ratio", str(ratio)]
    if model:
        cmd += ["--model", model, "--learning-rate", "1e-3"]
    if args.max_steps:
        cmd += ["--max-steps", str(args.max_steps)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    os.makedirs(out, exist_ok=True)
    with open(out + ".log", "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}); see {out}.log")
    invalidated = sum("Invalidate trace cache" in line for line in open(out + ".log", errors="replace"))
    steps = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if l.strip()]
    skip = min(args.warmup_steps, len(steps) - 1)  # first steps pay one-off costs (allocations, trace)
    steps = steps[skip:]
    parts = {p: sum(s["time"].get(p, 0.0) for s in steps) for p in PARTS}
    total = sum(s["time"]["total"] for s in steps)
    samples = sum(s["trained"] for s in steps)
    return {"name": name, "method": spec, "prune_ratio": ratio if method != "full" else 0.0, "steps": len(steps),
            "seconds": total, "samples_trained": samples,
            "seconds_per_sample_seen": total / sum(s["candidates"] for s in steps),
            "train_ms_per_sample": 1000 * parts["train"] / max(samples, 1),
            "trace_invalidations": invalidated,
            "tokens_per_s_train": sum(s["tokens"] for s in steps) / max(parts["train"], 1e-9),
            "tokens_per_s_score": sum(s["score_tokens"] for s in steps) / max(parts["score_forward"] + parts["features"], 1e-9),
            "parts": parts,
            "overhead_share": (parts["curvature"] + parts["features"] + parts["gather"] + parts["select"]
                               + parts["broadcast"]) / max(total, 1e-9)}


def _markdown(runs: list[dict]) -> str:
    lines = ["| method | prune ratio | steps | seconds | ratio to full | ideal (1+3(1-a))/3 | off by | "
             "train ms / trained sample | ZeRO-3 trace invalidations | selection overhead share | train tok/s | "
             "score tok/s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['method']} | {r['prune_ratio']} | {r['steps']} | {r['seconds']:.1f} | {r['ratio_to_full']:.3f} | "
                     f"{r['ideal']:.3f} | {100 * r['off_by']:+.1f}% | {r['train_ms_per_sample']:.2f} | "
                     f"{r['trace_invalidations']} | {100 * r['overhead_share']:.1f}% | "
                     f"{r['tokens_per_s_train']:.0f} | {r['tokens_per_s_score']:.0f} |")
    parts = ["| run | " + " | ".join(PARTS) + " |", "|---|" + "---|" * len(PARTS)]
    for r in runs:
        parts.append(f"| {r['name']} | " + " | ".join(f"{r['parts'][k]:.2f}" for k in PARTS) + " |")
    return "\n".join(lines) + "\n\nSeconds per part of the step, summed over the timed steps:\n\n" + "\n".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="launch/bench_epoch.py", description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=["optbatch:preset=paper", "optbatch"],
                   help="Variants timed against full, as launch/bench.py writes them (method:key=value,...).")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.7])
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=0, help="cap steps per run (0: the whole epoch)")
    p.add_argument("--warmup-steps", type=int, default=5, help="leading steps left out of the timing")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--port", type=int, default=29533)
    p.add_argument("--deepspeed", default="ds_configs/zero3.json")
    p.add_argument("--trace-warnings", action="store_true",
                   help="Log ZeRO-3's parameter-trace invalidations and count them per run.")
    p.add_argument("--model-size", choices=sorted(MODEL_SIZES), default="small")
    p.add_argument("--gpu", action="store_true", help="shorthand for the bf16 GPU variant (model size 'gpu')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_out/epoch")
    args = p.parse_args(argv)
    if args.gpu:
        args.model_size = "gpu"
    os.makedirs(args.out, exist_ok=True)
    model = None
    if args.model_size != "small":
        from optbatch_ds.data.demo import make_demo_data
        from optbatch_ds.modeling import build_default_model, cache_root

        demo = make_demo_data(os.path.join(args.out, "demo"), seed=0)
        texts = [m["content"] for l in open(demo["train"]) for m in json.loads(l)["messages"]]
        model = build_default_model(texts, cache_root(os.path.join(args.out, "x")), seed=args.seed,
                                    config_overrides=MODEL_SIZES[args.model_size])
    runs = [run_one(args, "full", 0.0, model)]
    runs += [run_one(args, spec, a, model) for a in args.ratios for spec in args.methods]
    full = runs[0]
    # compare per sample seen (one epoch = every sample seen once), so partial epochs compare fairly
    for r in runs:
        r["ratio_to_full"] = r["seconds_per_sample_seen"] / full["seconds_per_sample_seen"]
        r["ideal"] = ideal_ratio(r["prune_ratio"]) if r["method"] != "full" else 1.0
        r["off_by"] = r["ratio_to_full"] / r["ideal"] - 1
    report = _markdown(runs)
    print(report)
    with open(os.path.join(args.out, "epoch_cost.json"), "w") as f:
        json.dump({"args": vars(args), "runs": runs}, f, indent=2)
    with open(os.path.join(args.out, "epoch_cost.md"), "w") as f:
        f.write(report + "\n")
    return 0
