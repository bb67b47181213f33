"""Offline OptBatch selection: score a dataset with a model and write the records the selector keeps.

Run as:
    python launch/prune.py --deepspeed ds_configs/zero3.json --output outputs/kept.jsonl          # built-in model + demo data
    python launch/prune.py --deepspeed ds_configs/zero3.json --model PATH --data train.json --output kept.json
    deepspeed --num_gpus 2 launch/prune.py --deepspeed ds_configs/zero3.json --data F --output OUT --warmup-steps 50

Writes OUT (the kept original records, in the input's format), OUT's stem + .selection.jsonl (one line
per input record: index, source, pool, loss, stratum, selected) and + .selection.summary.json.
Logic: optbatch_ds/prune.py (on the same step functions as launch/train.py). Formerly launch/select.py,
renamed because that name shadowed the standard library's `select` module.
"""
import sys

from optbatch_ds.cli import run_main  # sets the offline defaults before transformers is imported

if __name__ == "__main__":
    sys.exit(run_main("optbatch_ds.prune"))
