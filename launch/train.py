"""Instruction-tune a causal LM with DeepSpeed, training on the part of each batch worth it (OptBatch).

Run as:
    deepspeed --num_gpus 2 launch/train.py --deepspeed ds_configs/zero3.json        # CPU: 2 ranks, built-in model + demo data
    deepspeed launch/train.py --deepspeed ds_configs/zero3.json --model PATH --data FILE
    python launch/train.py --deepspeed ds_configs/zero2.json                          # one process, no launcher
    mpirun -np 2 python launch/train.py --deepspeed ds_configs/zero3.json            # MPI discovery (mpi4py)

The recipe: optbatch_ds/trainer.py.
"""
import sys

from optbatch_ds.cli import run_main  # sets the offline defaults before transformers is imported

if __name__ == "__main__":
    sys.exit(run_main("optbatch_ds.trainer"))
