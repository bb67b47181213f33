"""Epoch cost of OptBatch against full-data training, next to the cost model of DESIGN §3.

Run as:
    python launch/bench_epoch.py                                  # CPU: default model, demo data, 2 ranks
    python launch/bench_epoch.py --ratios 0.3 0.5 0.7 --epochs 1 --out bench_out/epoch
    python launch/bench_epoch.py --ratios 0.3 --max-steps 150 --trace-warnings \
        --methods optbatch:preset=paper optbatch:preset=paper,scoring=stale    # the ZeRO-3 trace-cache finding
    python launch/bench_epoch.py --gpu --nproc 1 --model-size gpu  # GPU variant: bigger Llama, bf16

Each configuration is one real run (`deepspeed launch/train.py ...`); the epoch time is the sum of the
per-step times in metrics.jsonl (start-up, evaluation and export excluded), so the ratios compare
steps only. Ideal ratio with F_b = 2 F_f: (1 + 3 (1 - alpha)) / 3. Prints a markdown table and writes
`epoch_cost.json`; machine noise is large on shared CPUs, so compare ratios within one invocation.
"""
import sys

from optbatch_ds.cli import run_main  # sets the offline defaults before transformers is imported

if __name__ == "__main__":
    sys.exit(run_main("optbatch_ds.bench.epoch"))
