"""Run as: python launch/bench_tokenize.py --records 100000 --out /tmp/tok_bench [--max-seq-len 256] [--json PATH]

Start-up cost of tokenization on a demo set of that many records: Python lists on every start (before) against
the Arrow cache of `optbatch_ds.data.cache` (its first start, then every later start). Prints a markdown table of
seconds and resident memory per token; numbers in docs/SCALE.md come from it.
"""
import sys

from optbatch_ds.cli import run_main  # sets the offline defaults before transformers is imported

if __name__ == "__main__":
    sys.exit(run_main("optbatch_ds.bench.tokenize_startup"))
