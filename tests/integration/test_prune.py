"""launch/prune.py end to end: offline selection on an Alpaca .json and a messages .jsonl, 1 and 2 ranks."""
import json
import os
import random
import subprocess
import sys

import pytest

from tests.dist_utils import free_port
from tests.helpers import REPO, read_jsonl

pytestmark = pytest.mark.integration

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
B, C, ALPHA = 14, 20, 0.3  # train_batch_size 14 -> c = ceil(14 / 0.7) = 20, a multiple of 1 and 2 ranks
WORDS = "apple river stone cloud quick brown fox jumps over lazy dog green blue red small large city house tree".split()


def _sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("select")
    rng = random.Random(0)
    alpaca = [{"instruction": f"Task {i}: repeat {_sentence(rng, 3)}", "input": _sentence(rng, rng.randint(0, 4)),
               "output": _sentence(rng, rng.randint(2, 9)), "id": i} for i in range(67)]
    with open(root / "alpaca.json", "w") as f:
        json.dump(alpaca, f, indent=2)
    with open(root / "chat.jsonl", "w") as f:
        for i in range(70):
            if i == 13:  # a bad record: the conversation ends with the user
                f.write(json.dumps({"messages": [{"role": "user", "content": "no answer"}]}) + "\n")
                continue
            turns = [{"role": "user", "content": f"Q{i} {_sentence(rng, 4)}"},
                     {"role": "assistant", "content": _sentence(rng, rng.randint(2, 8))}]
            if i % 3 == 0:
                turns += [{"role": "user", "content": _sentence(rng, 3)},
                          {"role": "assistant", "content": _sentence(rng, 4)}]
            f.write(json.dumps({"messages": turns, "task": f"t{i % 2}"}, ensure_ascii=False) + "\n")
    ds = {"train_batch_size": B, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                                                    "weight_decay": 0.0}},
          "zero_optimization": {"stage": 3}, "steps_per_print": 10**9,
          "optbatch": {"method": "optbatch", "prune_ratio": ALPHA, "strata": 3, "sketch_dim": 64}}
    with open(root / "zero3.json", "w") as f:
        json.dump(ds, f)
    return root


def select(*args, nproc=1):
    script = ["launch/prune.py", *map(str, args)]
    cmd = ([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port",
            str(free_port()), *script] if nproc > 1 else [sys.executable, *script])
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


def expected_kept(n):
    """Full pools keep b of c; the last partial pool of r keeps round(r * (1 - alpha))."""
    return (n // C) * B + round((n % C) * (1 - ALPHA))


def check_sidecar(sidecar, n_records, kept_sources):
    assert [l["index"] for l in sidecar] == list(range(n_records))
    assert [l["source"] for l in sidecar if l["selected"]] == kept_sources
    pools = {}
    for l in sidecar:
        if l.get("skipped"):
            assert l["selected"] is False and l["loss"] is None and l["pool"] is None
            continue
        assert isinstance(l["loss"], float) and l["stratum"] in (0, 1, 2)
        pools.setdefault(l["pool"], []).append(l["selected"])
    sizes = sorted(len(v) for v in pools.values())
    n = sum(sizes)
    assert sizes == sorted([C] * (n // C) + ([n % C] if n % C else []))
    for flags in pools.values():  # every pool kept exactly its budget
        assert sum(flags) == (B if len(flags) == C else round(len(flags) * (1 - ALPHA)))
    return n


def test_alpaca_json_is_a_deterministic_subset(data):
    outs = [data / "alpaca_out" / f"run{i}" / "kept.json" for i in (1, 2)]
    for out in outs:  # same seed twice (each run builds the default model in its own cache)
        log = select("--deepspeed", data / "zero3.json", "--data", data / "alpaca.json", "--output", out,
                     "--warmup-steps", "2")
        assert "warm-up | 2 steps" in log
    text = open(data / "alpaca.json").read()
    records = json.load(open(data / "alpaca.json"))
    kept = json.load(open(outs[0]))  # a valid JSON array of the input's own records
    canon = [json.dumps(r, sort_keys=True) for r in records]
    assert len(kept) == expected_kept(67) == 47
    assert len({json.dumps(r, sort_keys=True) for r in kept}) == len(kept)
    positions = [canon.index(json.dumps(r, sort_keys=True)) for r in kept]
    assert positions == sorted(positions)  # in input order
    raw = open(outs[0]).read()
    for r in kept:  # byte for byte: each element's text, as written in the input, is in the output
        element = json.dumps(r, indent=2).replace("\n", "\n  ")
        assert element in text and element in raw
    sidecar = read_jsonl(str(outs[0])[:-len(".json")] + ".selection.jsonl")
    lines = text.splitlines()
    starts = [i + 1 for i, l in enumerate(lines) if l == "  {"]
    kept_sources = [f"{data / 'alpaca.json'}:{starts[r['id']]}" for r in kept]
    assert check_sidecar(sidecar, 67, kept_sources) == 67
    summary = json.load(open(str(outs[0])[:-len(".json")] + ".selection.summary.json"))
    assert (summary["kept"], summary["records"], summary["skipped"], summary["scored"]) == (47, 67, 0, 67)
    assert summary["last_pool"] == {"candidates": 7, "budget": 5} and summary["warmup_steps"] == 2
    for a, b in (("kept.json", "kept.json"), ("kept.selection.jsonl", "kept.selection.jsonl")):
        assert open(outs[0].parent / a, "rb").read() == open(outs[1].parent / b, "rb").read()


def test_messages_jsonl_one_and_two_ranks(data):
    out1, out2 = data / "chat_out" / "one" / "kept.jsonl", data / "chat_out" / "two" / "kept.jsonl"
    args = ("--deepspeed", data / "zero3.json", "--data", data / "chat.jsonl", "--on-bad-record", "skip")
    log = select(*args, "--output", out1)
    assert "1 skipped as bad" in log
    select(*args, "--output", out2, nproc=2)
    lines_in = open(data / "chat.jsonl", "rb").read().splitlines(keepends=True)
    results = []
    for out in (out1, out2):
        kept = open(out, "rb").read().splitlines(keepends=True)
        assert all(json.loads(l)["messages"] for l in kept)  # a valid .jsonl of the input's format
        assert len(kept) == expected_kept(69) == 48  # 70 lines, 1 skipped as bad
        positions = [lines_in.index(l) for l in kept]  # byte for byte the input's own lines, in input order
        assert positions == sorted(set(positions))
        sidecar = read_jsonl(str(out)[:-len(".jsonl")] + ".selection.jsonl")
        check_sidecar(sidecar, 70, [f"{data / 'chat.jsonl'}:{p + 1}" for p in positions])
        bad = [l for l in sidecar if l.get("skipped")]
        assert [(l["index"], l["skipped"]) for l in bad] == [(13, "no_assistant_turn")]
        summary = json.load(open(str(out)[:-len(".jsonl")] + ".selection.summary.json"))
        assert summary["skipped"] == 1 and summary["skipped_records"][0]["source"].endswith("chat.jsonl:14")
        results.append((kept, sidecar))
    # 2 ranks score the same pools (c = 20 on both) with the same weights; each rank's forward sees a
    # different batch shape, so losses may differ in the last bits: the selection must not
    (k1, s1), (k2, s2) = results
    assert k1 == k2
    assert [l["selected"] for l in s1] == [l["selected"] for l in s2]
    for a, b in zip(s1, s2):
        assert (a["loss"] is None) == (b["loss"] is None)
        if a["loss"] is not None:
            assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(a["loss"]))


def test_output_must_match_the_input_format(data):
    proc = subprocess.run([sys.executable, "launch/prune.py", "--data", str(data / "chat.jsonl"), "--output",
                           str(data / "x.json")], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "name the output *.jsonl" in proc.stderr
