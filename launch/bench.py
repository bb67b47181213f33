"""Benchmark grid: methods x prune ratios x seeds, each run through launch/train.py and the deepspeed launcher.

Run as:
    python launch/bench.py                                         # full grid on the demo set: 6 methods x (0.2,0.3,0.5,0.7) x 3 seeds, 10 epochs, 2 CPU ranks
    python launch/bench.py --nproc 1 --jobs 2 --deepspeed ds_configs/bench_1rank.json \
        --eval-samples-per-task 50 --out bench_out/e10                # the same grid as BENCHMARKS.md ran it: 2 one-rank runs at a time
    python launch/bench.py --dry-run                               # print the plan (runs, estimated time) only
    python launch/bench.py --methods full,random,optbatch --ratios 0.3,0.5 --seeds 2 --epochs 2 --out bench_out/small
    python launch/bench.py --methods full,optbatch --ablations     # + optbatch:strata=1, :within=random, :quotas=uniform,
                                                                   #   :feature=grad_raw, :feature=hidden at --ablation-ratio 0.3
    python launch/bench.py --methods random,optbatch:strata=5,temperature=2 --ratios 0.3
    python launch/bench.py --num-gpus 8 --model PATH --data train.jsonl --eval-data eval.jsonl -- --max-seq-len 1024
    python launch/bench.py --methods random,optbatch --ratios 0.3 --seeds 1 --max-steps 4 --eval-every 2 \
        --eval-samples-per-task 2 --out /tmp/bench_micro           # the integration test's micro-grid (~1-2 min on 2 CPU cores)

Writes to --out (default bench_out/): runs/<run>/ (one training run each, with log.txt), results.csv,
results.json, results.md, quality_vs_ratio.png, quality_vs_time.png, heldout_vs_epoch.png.
Rerunning the same command skips the finished runs (those with eval.json) and retries the rest.
"""
import sys

from optbatch_ds.cli import run_main  # sets the offline defaults before transformers is imported

if __name__ == "__main__":
    sys.exit(run_main("optbatch_ds.bench.grid"))
