"""A user's model directory with their Alpaca JSON or ShareGPT JSONL: trains, exports, loads."""
import json
import os
import subprocess
import sys

import pytest

from tests.dist_utils import free_port
from tests.helpers import REPO, read_jsonl

pytestmark = pytest.mark.integration

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _records(n=64):
    """Alpaca-style rows from a tiny arithmetic task (enough for 3 steps of 24 candidates)."""
    return [{"instruction": f"What is {a} plus {b}?", "input": "" if a % 2 else "Answer with a number.",
             "output": str(a + b)} for a, b in ((i % 9 + 1, (i * 7) % 11) for i in range(n))]


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    from optbatch_ds.modeling import build_default_model

    root = tmp_path_factory.mktemp("user")
    rows = _records()
    model_dir = build_default_model([r["instruction"] + " " + r["output"] for r in rows] * 4, str(root / "cache"))
    alpaca = root / "alpaca.json"
    alpaca.write_text(json.dumps(rows, indent=1))
    sharegpt = root / "chats.jsonl"
    with open(sharegpt, "w") as f:
        for r in rows:
            conv = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": r["instruction"]},
                    {"from": "gpt", "value": r["output"]}, {"from": "human", "value": "And twice that?"},
                    {"from": "gpt", "value": str(2 * int(r["output"]))}]
            f.write(json.dumps({"conversations": conv}) + "\n")
    return root, model_dir, {"alpaca": alpaca, "sharegpt": sharegpt}


@pytest.mark.parametrize("fmt", ["alpaca", "sharegpt"])
def test_user_model_and_data_train_and_export(user_files, fmt):
    root, model_dir, files = user_files
    out = root / f"run_{fmt}"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "launch/train.py", "--deepspeed", "ds_configs/zero3.json", "--model", model_dir, "--data", str(files[fmt]),
           "--output-dir", str(out), "--max-steps", "3", "--prune-ratio", "0.3", "--learning-rate", "1e-3",
           "--log-every", "0"]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    cfg = json.load(open(out / "config.json"))
    assert cfg["model_path"] == model_dir and cfg["train_data"] == str(files[fmt])
    sel = read_jsonl(out / "selection.jsonl")
    assert [len(l["selected"]) for l in sel] == [16, 16, 16] and all(sum(l["quotas"]) == 16 for l in sel)
    assert not (out / "eval.json").exists()  # no held-out data given: no evaluation, and none invented
    script = (f"from transformers import AutoModelForCausalLM, AutoTokenizer\n"
              f"tok = AutoTokenizer.from_pretrained({str(out / 'final')!r})\n"
              f"m = AutoModelForCausalLM.from_pretrained({str(out / 'final')!r})\n"
              f"ids = tok.apply_chat_template([{{'role': 'user', 'content': 'What is 2 plus 3?'}}], "
              f"add_generation_prompt=True, return_tensors='pt', return_dict=True)\n"
              f"print('OK', m.generate(**ids, max_new_tokens=4, do_sample=False).shape)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=str(root), env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
