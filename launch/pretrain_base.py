"""Build (once, then cached) the pretrained base model of the benchmark's fine-tuning regime.

Run as:
    nice -n 19 python launch/pretrain_base.py --dataset demo --out bench_out/pretrain            # ~5 min, 1 CPU core
    python launch/pretrain_base.py --dataset pydoc --out bench_out/pretrain --steps 800
    python launch/pretrain_base.py --dataset demo --device cuda --threads 0 --no-check

Generates the instruction set with its pretraining corpus under OUT/<dataset>_data, trains the tokenizer on the
corpus plus the train records, pretrains the default Llama on the corpus (optbatch_ds.bench.pretrain) into
OUT/pretrained_base_<fingerprint>/ (with pretrain_log.json: loss curve, wall and CPU time), and, with --check (the
default), prints and writes OUT/answer_nll_<dataset>.json: per task, the NLL of the correct final answers of the
train records against wrong ones (another record's answer), for the base and a from-scratch model, as they are
and after --warmup-steps steps of chat warm-up on the reference split (optbatch_ds.bench.answer_nll).
"""
import sys

from optbatch_ds.cli import run_main  # sets the offline defaults before transformers is imported

if __name__ == "__main__":
    sys.exit(run_main("optbatch_ds.bench.pretrain"))
