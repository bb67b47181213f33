"""Instruction-tune a causal LM with DeepSpeed, training on the part of each batch worth it (OptBatch).

Run as:
    deepspeed --num_gpus 2 launch/train.py --deepspeed ds_configs/zero3.json        # CPU: 2 ranks, built-in model + demo data
    deepspeed launch/train.py --deepspeed ds_configs/zero3.json --model PATH --data FILE
    python launch/train.py --deepspeed ds_configs/zero2.json                          # one process, no launcher
    mpirun -np 2 python launch/train.py --deepspeed ds_configs/zero3.json            # MPI discovery (mpi4py)
"""
import os
import sys

# launch/ must not shadow the standard library (launch/select.py vs the stdlib `select` module):
# replace the script's folder on the path with the repository root before anything else is imported.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from optbatch_ds.cli import run_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_main("optbatch_ds.trainer"))
