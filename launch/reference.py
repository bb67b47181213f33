"""Reference losses for the 'reducible' signal: train a small reference model, score every training record once.

Run as:
    python launch/reference.py --data train.jsonl --reference-data clean.jsonl --output refs/      # clean reference set
    python launch/reference.py --data train.jsonl --output refs/                                  # holdout-free (two halves)
    deepspeed --num_gpus 2 launch/reference.py --deepspeed ds_configs/zero3.json --data train.jsonl --output refs/

Then: launch/train.py ... --reference-losses refs/ (with "signal": "reducible" in the "optbatch" section).
Writes refs/reference_losses.jsonl and refs/cost.json (counted in every comparison). Logic: optbatch_ds/reference.py.
"""
import sys

from optbatch_ds.cli import run_main  # sets the offline defaults before transformers is imported

if __name__ == "__main__":
    sys.exit(run_main("optbatch_ds.reference"))
