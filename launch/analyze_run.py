"""Run as: python launch/analyze_run.py RUN_DIR [--json PATH]

What a finished run's selection did over training (demo data, or any .jsonl whose records carry "task" and
"defect"): per epoch, the share of defective samples trained, how well the candidate loss separates
defective from clean samples (ROC AUC), and the median candidate loss of each task / defect group.
The numbers behind BENCHMARKS.md §4.
"""
import os
import sys

# Python puts this script's folder first on sys.path, where launch/select.py would shadow the standard
# library's `select` module (imported by subprocess, hence by torch): drop the folder, add the repository root.
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

from optbatch_ds.cli import run_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_main("optbatch_ds.run_analysis"))
