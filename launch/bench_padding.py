"""How much of a step's compute goes to padding, with and without dealing each step's samples by length.

Run as:
    python launch/bench_padding.py [--steps 300] [--json padding.json]

Simulated steps (no model): the demo set and a long-tailed lognormal length mix (median 400 tokens), at the
shipped batch shapes. Logic: optbatch_ds/bench/padding.py.
"""
import sys

from optbatch_ds.cli import run_main  # sets the offline defaults before transformers is imported

if __name__ == "__main__":
    sys.exit(run_main("optbatch_ds.bench.padding"))
