"""Write the trained model as a plain Hugging Face directory (loads without optbatch_ds installed)."""
from __future__ import annotations

import os
import shutil
import tempfile

import torch

from optbatch_ds import comm
from optbatch_ds.data import stop_token_ids


def export_hf(engine, tokenizer, out_dir: str, rank: int, stage3: bool) -> None:
    """Every rank must call this: under ZeRO-3 the shards are gathered (16-bit when training in
    16 bits) by DeepSpeed's save_16bit_model, then rank 0 writes safetensors, config, the tokenizer with the
    chat template the run trained with, and a generation config that stops on every token that ends an
    assistant turn under that template (eos, <|im_end|>, <|eot_id|>, ...)."""
    model = engine.module
    state_dict = None
    if stage3:
        tmp = tempfile.mkdtemp(prefix=".export_", dir=os.path.dirname(os.path.abspath(out_dir)))
        try:
            if not engine.save_16bit_model(tmp, "consolidated.bin"):
                raise RuntimeError("DeepSpeed did not gather the ZeRO-3 weights; set "
                                   "zero_optimization.stage3_gather_16bit_weights_on_model_save to true")
            comm.barrier()
            if rank == 0:
                state_dict = torch.load(os.path.join(tmp, "consolidated.bin"), map_location="cpu", weights_only=True)
        finally:
            comm.barrier()
            shutil.rmtree(tmp, ignore_errors=True)  # every rank made its own (only rank 0's holds the file)
    if rank == 0:
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        gen = model.generation_config
        gen.pad_token_id = tokenizer.pad_token_id
        stops = stop_token_ids(tokenizer)
        gen.eos_token_id = stops if len(stops) > 1 else (stops[0] if stops else tokenizer.eos_token_id)
        gen.save_pretrained(out_dir)
    comm.barrier()
