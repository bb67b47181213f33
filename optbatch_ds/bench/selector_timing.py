"""Timing of `optbatch_ds.selection.select` (step 4, rank 0) on synthetic inputs (launch/bench_selector.py).

One CPU thread over a grid of candidates (2048, 4096, 8192) x budget ratio (0.5, 0.7) x sketch dim (256, 512,
1024), median of 3 repeats, then the headline case (8192 candidates, budget 4096, dim 1024) against its 2 s
target. Inputs: losses uniform in [0.5, 4.5] nats, Gaussian float32 sketches.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from optbatch_ds.selection import METHODS, Candidates, SelectionConfig, select

CANDIDATES = (2048, 4096, 8192)
RATIOS = (0.5, 0.7)
DIMS = (256, 512, 1024)
HEADLINE = (8192, 4096, 1024)
TARGET_S = 2.0


def time_case(c, budget, dim, method, repeats):
    g = torch.Generator().manual_seed(c * 31 + dim)
    losses = torch.rand(c, generator=g) * 4 + 0.5
    sketches = torch.randn(c, dim, generator=g)
    cfg = SelectionConfig(method=method)
    budget = c if method == "full" else budget
    times, info = [], {}
    for rep in range(repeats):
        t0 = time.perf_counter()
        info = select(Candidates(losses, sketches), budget, cfg, torch.Generator().manual_seed(rep)).info
        times.append(time.perf_counter() - t0)
    return {"candidates": c, "budget": budget, "sketch_dim": dim, "method": method,
            "median_s": statistics.median(times), "min_s": min(times), "quotas": info.get("quotas")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="launch/bench_selector.py", description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--method", default="optbatch", choices=METHODS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the target is for 1)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
               f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print(f"# select() timing | method {args.method} | {machine}\n")
    time_case(512, 256, 64, args.method, 1)  # warm-up (allocator, BLAS init)

    rows = []
    print("| candidates | budget | sketch_dim | median s | min s | quotas (low..high loss) |")
    print("|---:|---:|---:|---:|---:|---|")
    for c in CANDIDATES:
        for ratio in RATIOS:
            for dim in DIMS:
                row = time_case(c, int(c * ratio), dim, args.method, args.repeats)
                rows.append(row)
                print(f"| {row['candidates']} | {row['budget']} | {row['sketch_dim']} | {row['median_s']:.3f} "
                      f"| {row['min_s']:.3f} | {row['quotas'] or ''} |", flush=True)

    c, b, dim = HEADLINE
    head = time_case(c, b, dim, args.method, args.repeats)
    ok = head["median_s"] < TARGET_S
    print(f"\nheadline {c} candidates / budget {head['budget']} / dim {dim}: median {head['median_s']:.3f} s "
          f"(target < {TARGET_S} s on one thread: {'PASS' if ok else 'FAIL'})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"machine": machine, "rows": rows, "headline": head, "target_s": TARGET_S,
                       "headline_pass": ok}, f, indent=2)
        print(f"wrote {args.json}")
    return 0 if ok else 1
