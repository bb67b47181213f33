"""Epoch cost of OptBatch against full-data training, next to the cost model of DESIGN §3 (launch/bench_epoch.py).

Each configuration is one real run (`deepspeed launch/train.py ...`); the epoch time is the sum of the
per-step times in metrics.jsonl (start-up, evaluation and export excluded), so the ratios compare
steps only. Ideal ratio with F_b = 2 F_f: (1 + 3 (1 - alpha)) / 3. Prints a markdown table and writes
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


def run_one(args, name: str, method: str, ratio: float, model: str | None) -> dict:
    out = os.path.join(args.out, name)
    cmd = ([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.nproc),
            "--master_port", str(args.port)] if args.nproc > 1 else [sys.executable])
    cmd += ["launch/train.py", "--deepspeed", args.deepspeed, "--method", method, "--output-dir", out,
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
    steps = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if l.strip()]
    skip = min(args.warmup_steps, len(steps) - 1)  # first steps pay one-off costs (allocations, trace)
    steps = steps[skip:]
    parts = {p: sum(s["time"].get(p, 0.0) for s in steps) for p in PARTS}
    total = sum(s["time"]["total"] for s in steps)
    samples = sum(s["trained"] for s in steps)
    return {"name": name, "method": method, "prune_ratio": ratio if method != "full" else 0.0, "steps": len(steps),
            "seconds": total, "samples_trained": samples,
            "seconds_per_sample_seen": total / sum(s["candidates"] for s in steps),
            "tokens_per_s_train": sum(s["tokens"] for s in steps) / max(parts["train"], 1e-9),
            "tokens_per_s_score": sum(s["score_tokens"] for s in steps) / max(parts["score_forward"] + parts["features"], 1e-9),
            "parts": parts,
            "overhead_share": (parts["curvature"] + parts["features"] + parts["gather"] + parts["select"]
                               + parts["broadcast"]) / max(total, 1e-9)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="launch/bench_epoch.py", description=__doc__.split("\n")[0])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.7])
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=0, help="cap steps per run (0: the whole epoch)")
    p.add_argument("--warmup-steps", type=int, default=5, help="leading steps left out of the timing")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--port", type=int, default=29533)
    p.add_argument("--deepspeed", default="ds_configs/zero3.json")
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
    runs = [run_one(args, "full", "full", 0.0, model)]
    for a in args.ratios:
        runs.append(run_one(args, f"optbatch_{a}", "optbatch", a, model))
    full = runs[0]
    # compare per sample seen (one epoch = every sample seen once), so partial epochs compare fairly
    lines = ["| method | prune ratio | steps | seconds | ratio to full | ideal (1+3(1-a))/3 | off by | "
             "selection overhead share | train tok/s | score tok/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        r["ratio_to_full"] = r["seconds_per_sample_seen"] / full["seconds_per_sample_seen"]
        r["ideal"] = ideal_ratio(r["prune_ratio"]) if r["method"] != "full" else 1.0
        r["off_by"] = r["ratio_to_full"] / r["ideal"] - 1
        lines.append(f"| {r['method']} | {r['prune_ratio']} | {r['steps']} | {r['seconds']:.1f} | {r['ratio_to_full']:.3f} | "
                     f"{r['ideal']:.3f} | {100 * r['off_by']:+.1f}% | {100 * r['overhead_share']:.1f}% | "
                     f"{r['tokens_per_s_train']:.0f} | {r['tokens_per_s_score']:.0f} |")
    parts = ["| run | " + " | ".join(PARTS) + " |", "|---|" + "---|" * len(PARTS)]
    for r in runs:
        parts.append(f"| {r['name']} | " + " | ".join(f"{r['parts'][k]:.2f}" for k in PARTS) + " |")
    report = "\n".join(lines) + "\n\nSeconds per part of the step, summed over the timed steps:\n\n" + "\n".join(parts)
    print(report)
    with open(os.path.join(args.out, "epoch_cost.json"), "w") as f:
        json.dump({"args": vars(args), "runs": runs}, f, indent=2)
    with open(os.path.join(args.out, "epoch_cost.md"), "w") as f:
        f.write(report + "\n")
    return 0
