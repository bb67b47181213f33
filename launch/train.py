"""Instruction-tune a causal LM with DeepSpeed, training on the part of each batch worth it (OptBatch).

Run as:
    deepspeed --num_gpus 2 launch/train.py --deepspeed ds_configs/zero3.json        # CPU: 2 ranks, built-in model + demo data
    deepspeed launch/train.py --deepspeed ds_configs/zero3.json --model PATH --data FILE
    python launch/train.py --deepspeed ds_configs/zero2.json                          # one process, no launcher
    mpirun -np 2 python launch/train.py --deepspeed ds_configs/zero3.json            # MPI discovery (mpi4py)
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
    sys.exit(run_main("optbatch_ds.trainer"))
