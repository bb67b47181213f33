"""The GPU check of what fits real models: bf16, sdpa / flash-attention, activation checkpointing on and off, LoRA,
QLoRA under ZeRO-3 — 3 OptBatch steps each on one GPU, printing tokens/s and peak memory; the LoRA exports are
loaded and generate (merged with transformers, the adapter with PEFT). Skipped without CUDA.

    python -m pytest -m gpu tests/gpu -q -s          (about 5 minutes on one GPU; -s prints the table)

A 160M-parameter Llama (hidden 1024, 12 layers, the built-in tokenizer) and 64 long records (1024 tokens each) are
built locally, so nothing is downloaded. Each case runs `python launch/train.py` on ds_configs/zero3.json (bf16
"auto": on; torch's AdamW instead of DeepSpeed's JIT-built FusedAdam, a constant learning rate) and reads its
metrics.jsonl. Asserted: every case trains 3 steps with finite losses; checkpointing changes no loss (bf16
tolerance); LoRA's losses move away from full fine-tuning's after the first update; checkpointing
lowers peak memory; LoRA lowers it below full fine-tuning; QLoRA below LoRA; the LoRA cases export an adapter.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO, read_jsonl

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CASES = {  # name: extra flags
    "full, sdpa, no checkpointing": ["--attn-implementation", "sdpa", "--no-gradient-checkpointing"],
    "full, sdpa, checkpointing": ["--attn-implementation", "sdpa", "--gradient-checkpointing"],
    "full, flash_attention_2, checkpointing": ["--attn-implementation", "flash_attention_2", "--gradient-checkpointing"],
    "lora, sdpa, checkpointing": ["--use-peft", "--gradient-checkpointing"],
    "qlora + zero3, sdpa, checkpointing": ["--use-peft", "--load-in-4bit", "--gradient-checkpointing"],
}


def _available(name: str) -> str | None:
    import importlib.util

    if "flash_attention_2" in name and importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed"
    if "qlora" in name and importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed"
    return None


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A mid-size Llama with the built-in tokenizer, and long chat records, in a temporary folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from optbatch_ds.modeling import build_default_model
    from optbatch_ds.session import ensure_demo_data

    root = tmp_path_factory.mktemp("gpu")
    demo = ensure_demo_data(str(root / ".optbatch_cache" / "demo_data"))
    texts = [m["content"] for r in read_jsonl(demo["train"]) for m in r["messages"]]
    tok = AutoTokenizer.from_pretrained(build_default_model(texts, str(root / ".optbatch_cache"), seed=0))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                      num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    ds = json.load(open(os.path.join(REPO, "ds_configs", "zero3.json")))
    ds["optimizer"]["params"].update(torch_adam=True, lr=1e-3)  # torch's AdamW: no minutes spent building FusedAdam
    # a constant rate: with "auto" warm-up over 3 steps the first two updates have lr 0 and nothing would move
    ds["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 1e-3, "warmup_max_lr": 1e-3, "warmup_num_steps": 1}}
    json.dump(ds, open(root / "zero3.json", "w"))
    words = " ".join(t for t in texts[:4000])
    with open(root / "long.jsonl", "w") as f:
        for i in range(64):
            answer = words[i * 97: i * 97 + 6000]
            f.write(json.dumps({"instruction": f"Write text number {i}.", "output": answer}) + "\n")
    return root


def _run(workdir, name, flags):
    """Train one case for 3 steps; (output dir, metrics lines). Raises AssertionError with the run's stderr tail."""
    out = workdir / "runs" / name.replace(" ", "_").replace(",", "").replace("+", "")
    cmd = [sys.executable, "launch/train.py", "--deepspeed", str(workdir / "zero3.json"), "--model", str(workdir / "model"),
           "--data", str(workdir / "long.jsonl"), "--eval-data", str(workdir / "long.jsonl"), "--max-seq-len", "1024",
           "--max-steps", "3", "--eval-samples-per-task", "1", "--eval-max-new-tokens", "4", "--log-every", "1",
           "--output-dir", str(out), *flags]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    metrics = read_jsonl(out / "metrics.jsonl")
    assert len(metrics) == 3 and all(m["loss"] == m["loss"] for m in metrics), f"{name}: {metrics}"
    return out, metrics


def _check_exports(workdir, out) -> str:
    """The LoRA exports load and generate: merged weights with plain transformers, the adapter with PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "final")
    ids = tok("Write text number 3.", return_tensors="pt").input_ids.cuda()
    merged = AutoModelForCausalLM.from_pretrained(out / "final", torch_dtype=torch.bfloat16).cuda()
    base = AutoModelForCausalLM.from_pretrained(workdir / "model", torch_dtype=torch.bfloat16)
    adapter = PeftModel.from_pretrained(base, out / "final" / "adapter").cuda()
    a = merged.generate(ids, max_new_tokens=4, do_sample=False)
    b = adapter.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert a.shape[1] > ids.shape[1] and b.shape[1] > ids.shape[1]
    return "merged and adapter generate"


def _case(workdir, name, flags, peak, report) -> str:
    """One row of the table; fills peak[name] and report[name]."""
    out, metrics = _run(workdir, name, flags)
    cfg = json.load(open(out / "config.json"))
    assert cfg["deepspeed"]["bf16"]["enabled"] is True or not torch.cuda.is_bf16_supported()
    peak[name] = max(m["peak_memory_gib"] for m in metrics)
    tps = sum(m["tokens_per_s"] for m in metrics[1:]) / 2  # step 1 includes warm-up
    note = ""
    if "lora" in name:
        assert (out / "final" / "adapter" / "adapter_model.safetensors").exists()
        assert cfg["model"]["curvature"] == "ema"
        note = _check_exports(workdir, out)
    report[name] = {"attention": cfg["model"]["attn_implementation"], "tokens_per_s": round(tps),
                    "peak_memory_gib": peak[name], "losses": [m["loss"] for m in metrics], "exports": note}
    return f"| {name} | {cfg['model']['attn_implementation']} | {tps:.0f} | {peak[name]:.2f} | {note} |"


def test_gpu_fit_matrix(workdir):
    """Every case runs (a failing one is reported in the table and fails the test at the end, so one run on a
    lent GPU shows them all); $GPU_REPORT, when set, receives the table's numbers as JSON."""
    rows, peak, report, failed = [], {}, {}, {}
    for name, flags in CASES.items():
        why = _available(name)
        if why:
            rows.append(f"| {name} | skipped: {why} | | | |")
            report[name] = {"skipped": why}
            continue
        try:
            rows.append(_case(workdir, name, flags, peak, report))
        except Exception as e:  # reported below; the other cases still run
            failed[name] = str(e)
            report[name] = {"failed": str(e)[-2000:]}
            rows.append(f"| {name} | FAILED: {str(e).splitlines()[0][:80]} | | | |")
    print("\n| case | attention | tokens/s (steps 2-3) | peak GiB | exports |\n|---|---|---|---|---|\n" + "\n".join(rows))
    if os.environ.get("GPU_REPORT"):
        with open(os.environ["GPU_REPORT"], "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": report}, f, indent=1)
    assert not failed, "\n\n".join(f"{k}:\n{v}" for k, v in failed.items())
    full, ckpt, lora = (report[k]["losses"] for k in ("full, sdpa, no checkpointing", "full, sdpa, checkpointing",
                                                          "lora, sdpa, checkpointing"))
    assert max(abs(a - b) for a, b in zip(full, ckpt)) < 2e-2, (full, ckpt)  # same maths, bf16 summation order
    assert lora[0] == pytest.approx(full[0], abs=2e-2) and lora[1:] != full[1:], (full, lora)
    assert peak["full, sdpa, checkpointing"] < peak["full, sdpa, no checkpointing"]
    assert peak["lora, sdpa, checkpointing"] < peak["full, sdpa, checkpointing"]
    if "qlora + zero3, sdpa, checkpointing" in peak:
        assert peak["qlora + zero3, sdpa, checkpointing"] < peak["lora, sdpa, checkpointing"]
