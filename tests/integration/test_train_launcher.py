"""The real entry point through the real `deepspeed` launcher, then the export with plain transformers."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import REPO, read_jsonl

pytestmark = pytest.mark.integration

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def deepspeed_cmd(*args, nproc=2):
    # the venv's launcher script, run with this interpreter so the same environment is used
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
            "--master_port", str(__import__("tests.dist_utils", fromlist=["free_port"]).free_port()),
            "launch/train.py", *args]


def run(cmd, timeout=900):
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("config,method", [("zero3", "optbatch"), ("zero2", "random")])
def test_launcher_trains_and_exports(tmp_path, config, method):
    out = tmp_path / "run"
    rc, log = run(deepspeed_cmd("--deepspeed", f"ds_configs/{config}.json", "--method", method, "--max-steps", "5",
                                "--output-dir", str(out), "--eval-samples-per-task", "3", "--eval-max-new-tokens", "8"))
    assert rc == 0, log[-4000:]
    for name in ("final/config.json", "final/model.safetensors", "final/tokenizer.json", "final/generation_config.json",
                 "eval.json", "metrics.jsonl", "selection.jsonl", "config.json", "checkpoints/step_000005/COMPLETE"):
        assert (out / name).exists(), name
    assert not list(out.glob(".export_*")), "the export's temporary folders are removed on every rank"
    ev = json.load(open(out / "eval.json"))
    assert set(ev) >= {"loss", "tasks"} and set(ev["tasks"]) == {"dialogue", "qa", "translation"}
    for m in ev["tasks"].values():
        assert set(m) >= {"exact_match", "bleu4", "rougeL"}
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    assert set(metrics[0]["time"]) >= {"draw", "score_forward", "features", "gather", "select", "broadcast", "train"}
    if method == "optbatch":
        sel = read_jsonl(out / "selection.jsonl")
        assert all(sum(l["quotas"]) == 16 and len(l["selected"]) == 16 and len(l["candidates"]) == 24 for l in sel)
    # the export loads and generates with plain transformers, without optbatch_ds
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained({str(out / 'final')!r})
        model = AutoModelForCausalLM.from_pretrained({str(out / 'final')!r})
        ids = tok.apply_chat_template([{{"role": "user", "content": "My name is Tom. What is my name?"}}],
                                      add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=6, do_sample=False)
        assert out.shape[1] > ids["input_ids"].shape[1]
        assert not any(m.startswith("optbatch_ds") for m in sys.modules)
        print("GENERATED", repr(tok.decode(out[0, ids["input_ids"].shape[1]:])))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "GENERATED" in proc.stdout, proc.stdout + proc.stderr
