"""Offline OptBatch selection: score a dataset with a model and write the records the selector keeps.

Run as:
    python launch/select.py --deepspeed ds_configs/zero3.json --output outputs/kept.jsonl          # built-in model + demo data
    python launch/select.py --deepspeed ds_configs/zero3.json --model PATH --data train.json --output kept.json
    deepspeed --num_gpus 2 launch/select.py --deepspeed ds_configs/zero3.json --data F --output OUT --warmup-steps 50

Writes OUT (the kept original records, in the input's format), OUT's stem + .selection.jsonl (one line
per input record: index, source, pool, loss, stratum, selected) and + .selection.summary.json.
Logic: optbatch_ds/offline.py.
"""
import os
import sys

# Python puts this script's folder first on sys.path, where launch/select.py would shadow the standard
# library's `select` module (imported by subprocess, hence by torch): drop the folder, add the repository root.
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

from optbatch_ds.cli import run_main  # noqa: E402  (sets the offline defaults)

if __name__ == "__main__":
    sys.exit(run_main("optbatch_ds.offline"))
