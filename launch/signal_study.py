"""Which per-sample signal tells a wrong answer from a hard one: candidate signals from a run's checkpoints, by ROC AUC.

Run as:
    python launch/train.py --deepspeed ds_configs/bench_1rank.json --method full --save-every 187 --no-export \
        --output-dir runs/study
    python launch/signal_study.py runs/study --steps 187,374,748,1122,1496 [--json study.json]

Logic and the candidate signals: optbatch_ds/bench/signal_study.py. The numbers behind BENCHMARKS.md's choice of signal.
"""
import sys

from optbatch_ds.cli import run_main  # sets the offline defaults before transformers is imported

if __name__ == "__main__":
    sys.exit(run_main("optbatch_ds.bench.signal_study"))
