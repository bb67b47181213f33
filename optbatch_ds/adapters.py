"""LoRA / QLoRA through PEFT: wrap the loaded model before `deepspeed.initialize` (ZeRO-3 included), and export
the trained adapter (final/adapter/, loads with `PeftModel.from_pretrained`) and the merged weights (final/,
loads with plain transformers).

    model = wrap_lora(model, options)                      # after modeling.load_model, before deepspeed.initialize
    export_lora(engine, tokenizer, "out/final", rank, LoraExport(model_path, dtype, merge=True, keep_alive=...))

Only the trainable tensors (the adapters, plus --lora-modules-to-save) are gathered under ZeRO-3; the merge
happens on rank 0 into a fresh CPU copy of the base loaded from the model directory, never inside the engine
(PEFT documents merging a ZeRO-3-partitioned model as unsupported). With QLoRA the merge goes into the original
16-bit base, not the 4-bit one the adapter was trained against: the usual practice (the difference is the
quantization error of the base, which the adapter never saw).
"""
from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass

import torch

from optbatch_ds import comm
from optbatch_ds.run_options import ModelOptions

ADAPTER_DIR = "adapter"


def is_peft_model(module) -> bool:
    """Whether `module` is a PEFT model (adapters around a frozen base)."""
    return hasattr(module, "peft_config") and hasattr(module, "get_base_model")


def wrap_lora(model, options: ModelOptions):
    """The model with LoRA adapters from the --lora-* flags (PEFT's `get_peft_model`): the base frozen, adapters and
    --lora-modules-to-save trainable. Call before `deepspeed.initialize`; under ZeRO-3 the new adapter tensors are
    partitioned by it like any other parameter."""
    from peft import LoraConfig, get_peft_model

    targets = options.lora_target_modules
    config = LoraConfig(
        r=options.lora_r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout, bias="none",
        task_type="CAUSAL_LM", target_modules=targets[0] if targets == ("all-linear",) else list(targets),
        modules_to_save=list(options.lora_modules_to_save) if options.lora_modules_to_save else None)
    return get_peft_model(model, config)


def trainable_state_dict(module, rank: int) -> dict[str, torch.Tensor] | None:
    """{name: full tensor on CPU} of the trainable parameters (the adapters), on rank 0; None elsewhere.
    Collective under ZeRO-3 (each trainable parameter is gathered once; the frozen base is never gathered)."""
    import deepspeed

    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    partitioned = any(hasattr(p, "ds_id") for _, p in named)
    out = {} if rank == 0 else None
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None, enabled=partitioned):
        if rank == 0:
            out = {n: p.detach().to("cpu", copy=True) for n, p in named}
    return out


@contextlib.contextmanager
def zero3_init_off(keep_alive):
    """transformers loads models without `deepspeed.zero.Init` inside (a plain CPU copy on one rank), then the
    run's ZeRO-3 setting is restored. `keep_alive`: the run's HfDeepSpeedConfig, or None without ZeRO-3."""
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if keep_alive is not None:
            set_hf_deepspeed_config(keep_alive)


@dataclass(frozen=True)
class LoraExport:
    """What `export_lora` needs besides the engine: the base model directory and dtype of the merged copy, whether
    to merge at all, the run's HfDeepSpeedConfig (None without ZeRO-3) and --trust-remote-code."""

    base_path: str
    dtype: torch.dtype
    merge: bool = True
    keep_alive: object = None
    trust_remote_code: bool = False


def export_lora(engine, tokenizer, out_dir: str, rank: int, spec: LoraExport) -> None:
    """Write out_dir/adapter/ (adapter_config.json + adapter_model.safetensors + tokenizer) and, with spec.merge, the
    merged model in out_dir (safetensors, config, tokenizer, generation config). Collective: every rank calls it."""
    state = trainable_state_dict(engine.module, rank)
    if rank == 0:
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        adapter_dir = os.path.join(out_dir, ADAPTER_DIR)
        save_adapter(engine.module, state, tokenizer, adapter_dir)
        if spec.merge:
            merge_adapter(adapter_dir, out_dir, tokenizer, spec)
    comm.barrier()


def save_adapter(peft_model, state: dict, tokenizer, adapter_dir: str) -> None:
    """The adapter as PEFT writes it (only the adapter tensors of `state` are kept), plus the tokenizer."""
    peft_model.save_pretrained(adapter_dir, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(adapter_dir)


def merge_adapter(adapter_dir: str, out_dir: str, tokenizer, spec: LoraExport) -> None:
    """Base (from spec.base_path, spec.dtype, CPU) + the adapter in adapter_dir, merged (`merge_and_unload`) and
    saved as a plain Hugging Face model in out_dir. Rank 0 only; needs the base's size in CPU memory."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with zero3_init_off(spec.keep_alive):
        base = AutoModelForCausalLM.from_pretrained(spec.base_path, dtype=spec.dtype,
                                                    trust_remote_code=spec.trust_remote_code)
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    gen = merged.generation_config
    gen.pad_token_id = tokenizer.pad_token_id
    gen.eos_token_id = tokenizer.eos_token_id
    gen.save_pretrained(out_dir)
