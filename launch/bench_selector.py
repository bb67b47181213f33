"""Run as: python launch/bench_selector.py [--json PATH] [--method optbatch] [--repeats 3] [--threads 1]

Times `optbatch_ds.selection.select` (step 4, rank 0) on one CPU thread over a grid of candidates
(2048, 4096, 8192) x budget ratio (0.5, 0.7) x sketch dim (256, 512, 1024), median of 3 repeats,
then the headline case (8192 candidates, budget 4096, dim 1024) against its 2 s target.
Inputs are synthetic: losses uniform in [0.5, 4.5] nats, Gaussian float32 sketches.
Prints a markdown table; --json PATH also writes the rows.
"""
import sys

from optbatch_ds.cli import run_main  # sets the offline defaults before transformers is imported

if __name__ == "__main__":
    sys.exit(run_main("optbatch_ds.bench.selector_timing"))
