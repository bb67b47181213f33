"""Run as: python launch/analyze_run.py RUN_DIR [--json PATH]

What a finished run's selection did over training (demo data, or any .jsonl whose records carry "task" and
"defect"): per epoch, the share of defective samples trained, how well the candidate loss separates
defective from clean samples (ROC AUC), and the median candidate loss of each task / defect group.
The numbers behind BENCHMARKS.md §4.
"""
import sys

from optbatch_ds.cli import run_main  # sets the offline defaults before transformers is imported

if __name__ == "__main__":
    sys.exit(run_main("optbatch_ds.bench.analyze_run"))
