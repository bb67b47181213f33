"""Bad data and bad configuration through the real entry point, one process, no launcher.

    python -m pytest tests/faults/test_bad_input.py -q

Each case runs `python launch/train.py --deepspeed ... --data FILE` as a user would and checks what a
user sees: exit code 2, one `error:` line naming the file/line or the key and the fix, no traceback,
nothing trained. The per-format and per-key unit tests live in tests/unit/test_data.py and
tests/unit/test_config.py; here only what crosses the entry point is tested.
"""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, read_jsonl

_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
ENV = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}  # one process, unless a test says otherwise
ENV.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
BROKEN_LINE = 5  # 1-based line of the broken record in the data file


def small_inputs(root, n_records: int) -> dict:
    """The built-in model, built the way the trainer builds it (same cache key, so runs without --model
    reuse it), and the first `n_records` demo records as a --data file: a setup of about a second.
    Shared by the modules of tests/faults (imported from here)."""
    from optbatch_ds.config import RunConfig
    from optbatch_ds.data import load_examples
    from optbatch_ds.modeling import build_default_model, cache_root
    from optbatch_ds.session import demo_data

    cache = cache_root(str(root / "out"))
    demo = demo_data(str(root / "out"))
    texts = [m["content"] for e in load_examples(demo["train"]) for m in e.messages]
    model = build_default_model(texts, cache, seed=RunConfig().seed)
    data = root / f"demo_first_{n_records}.jsonl"
    if not data.exists():
        with open(demo["train"]) as f:
            data.write_text("".join(next(f) for _ in range(n_records)))
    return {"model": model, "train": demo["train"], "data": str(data), "args": ["--model", model, "--data", str(data)]}


@pytest.fixture(scope="module")
def default_model(root):
    return small_inputs(root, 40)


@pytest.fixture(scope="module")
def good_lines(default_model):
    with open(default_model["train"]) as f:
        return [next(f) for _ in range(40)]


@pytest.fixture(scope="module")
def good_data(default_model):
    return default_model["data"]  # the first 40 demo records


def train(*args, out, timeout=300):
    cmd = [sys.executable, "launch/train.py", "--output-dir", str(out), "--log-every", "0", "--no-export", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    return proc


def assert_clean_refusal(proc, out, *needles):
    """Exit 2, one actionable `error:` line with every needle, no traceback, nothing trained."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    errors = [l for l in proc.stderr.splitlines() if "error:" in l]
    assert len(errors) == 1, proc.stderr[-4000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
    assert "optbatch_ds | world" not in proc.stdout  # the banner comes after the engine is built
    return errors[0]


# ---------------------------------------------------------------------------- bad data

@pytest.fixture(scope="module")
def broken_data(root, good_lines):
    """40 demo records with line BROKEN_LINE cut off mid-record (as a crashed writer leaves it)."""
    data = root / "broken.jsonl"
    lines = list(good_lines)
    lines.insert(BROKEN_LINE - 1, '{"messages": [{"role": "user", "content": "cut off here\n')
    data.write_text("".join(lines))
    return data


@pytest.mark.integration
def test_broken_json_line_stops_with_file_and_line(root, default_model, broken_data):
    out = root / "broken_error"
    proc = train("--deepspeed", "ds_configs/zero2.json", "--data", str(broken_data), "--model", default_model["model"],
                 "--max-steps", "2", out=out)
    line = assert_clean_refusal(proc, out, f"{broken_data}:{BROKEN_LINE}", "not valid JSON", "--on-bad-record skip")
    print(line)


@pytest.mark.integration
def test_broken_json_line_skipped_and_reported(root, default_model, broken_data):
    out = root / "broken_skip"
    proc = train("--deepspeed", "ds_configs/zero2.json", "--data", str(broken_data), "--model", default_model["model"],
                 "--max-steps", "2", "--on-bad-record", "skip", out=out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    assert "skipped 1 records" in proc.stdout
    report = json.load(open(out / "bad_records.json"))
    assert report["count"] == 1 and report["by_problem"] == {"invalid_json": 1}
    assert report["skipped"][0]["source"] == f"{broken_data}:{BROKEN_LINE}"
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2]
    assert (out / "checkpoints" / "step_000002" / "COMPLETE").exists()
    print(report)


@pytest.mark.unit
def test_cut_off_line_message_reads_cleanly(tmp_path):
    from optbatch_ds.data import DataError, load_examples

    data = tmp_path / "cut.jsonl"
    data.write_text('{"instruction": "hi", "output": "cut off')
    with pytest.raises(DataError, match=f"{data}:1: line is not valid JSON") as err:
        load_examples(str(data))
    assert " at at " not in str(err.value), str(err.value)


@pytest.mark.integration
@pytest.mark.parametrize("case", ["empty_file", "unknown_format_keys", "unknown_format_flag", "unknown_suffix",
                                  "offline_dataset_name"])
def test_bad_data_source_refused(root, default_model, good_data, case):
    out = root / f"data_{case}"
    extra = []
    if case == "empty_file":
        data, needles = root / "empty.jsonl", ["empty.jsonl", "no records (the file is empty)"]
        data.write_text("\n\n")
    elif case == "unknown_format_keys":
        data = root / "qa.jsonl"
        data.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(3)))
        needles = [f"{data}:1", "unknown format", "'question'", "--data-format"]
    elif case == "unknown_format_flag":
        data, extra, needles = good_data, ["--data-format", "alpacca"], ["unknown data format 'alpacca'",
                                                                          "did you mean 'alpaca'"]
    elif case == "unknown_suffix":
        data = root / "train.csv"
        data.write_text("instruction,output\nhi,there\n")
        needles = ["train.csv", "unknown file type", ".jsonl"]
    else:
        data, needles = "no_such_org/no_such_dataset", ["no_such_org/no_such_dataset", "could not be loaded offline",
                                                        "local .json/.jsonl/.parquet"]
    proc = train("--deepspeed", "ds_configs/zero2.json", "--data", str(data), "--model", default_model["model"],
                 *extra, "--max-steps", "2", out=out)
    print(assert_clean_refusal(proc, out, *needles))


@pytest.mark.integration
def test_tokenizer_larger_than_model_vocab(root, default_model, good_data):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    model_dir = root / "vocab32_model"
    if not (model_dir / "config.json").exists():
        LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2)).save_pretrained(model_dir)
        AutoTokenizer.from_pretrained(default_model["model"]).save_pretrained(model_dir)
    n_tok = len(AutoTokenizer.from_pretrained(model_dir))
    assert n_tok > 32
    out = root / "vocab_mismatch"
    proc = train("--deepspeed", "ds_configs/zero2.json", "--data", str(good_data), "--model", str(model_dir),
                 "--max-steps", "2", out=out)
    print(assert_clean_refusal(proc, out, f"tokenizer has {n_tok} tokens", "embeds only 32", str(model_dir)))


# ---------------------------------------------------------------------------- bad configuration

def _derived_config(path, top=None, optbatch=None):
    """ds_configs/zero2.json with some keys changed, written where the test can point --deepspeed at it."""
    cfg = json.load(open(os.path.join(REPO, "ds_configs", "zero2.json")))
    cfg.update(top or {})
    cfg["optbatch"].update(optbatch or {})
    path.write_text(json.dumps(cfg, indent=1))
    return str(path)


CONFIG_CASES = {
    # case: (JSON changes, extra flags, what the one error line must say: the key and the fix)
    "prune_ratio_one": (dict(optbatch={"prune_ratio": 1.0}), [],
                        ['"optbatch".prune_ratio', "1.0 is outside [0, 1)"]),
    "prune_ratio_flag": ({}, ["--prune-ratio", "1.0"], ['"optbatch".prune_ratio', "outside [0, 1)"]),
    "strata_over_candidates": (dict(optbatch={"strata": 13}), [],
                               ['"optbatch".strata 13', "12 candidates", "use strata <= 12"]),
    "batch_arithmetic": (dict(top={"train_batch_size": 12}), [],
                         ["train_batch_size 12 != train_micro_batch_size_per_gpu 8", "world size 1",
                          "set train_batch_size to 8"]),
    "unknown_optbatch_key": (dict(optbatch={"strata_count": 3}), [],
                             ["unknown key 'strata_count'", "did you mean 'strata'"]),
    "unknown_method": (dict(optbatch={"method": "optbach"}), [],
                       ['"optbatch".method', "'optbach' is not one of", "did you mean 'optbatch'"]),
    "unknown_flag": ({}, ["--max-step", "2"], ["unknown flag '--max-step'", "did you mean '--max-steps'"]),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_refused_before_training(root, default_model, good_data, tmp_path, case):
    changes, flags, needles = CONFIG_CASES[case]
    cfg = _derived_config(tmp_path / f"{case}.json", **changes)
    out = root / f"config_{case}"
    proc = train("--deepspeed", cfg, "--data", str(good_data), "--model", default_model["model"], *flags,
                 *([] if "--max-step" in flags else ["--max-steps", "2"]), out=out)
    print(assert_clean_refusal(proc, out, *needles))


@pytest.mark.integration
def test_bad_config_reported_before_the_data_is_read(root, tmp_path):
    """A config mistake is named first, before any data or model loading (which can take minutes)."""
    cfg = _derived_config(tmp_path / "strata.json", optbatch={"strata": 13})
    out = root / "config_before_data"
    proc = train("--deepspeed", cfg, "--data", str(tmp_path / "does_not_exist.jsonl"),
                 "--model", str(tmp_path / "no_model_here"), "--max-steps", "2", out=out, timeout=120)
    print(assert_clean_refusal(proc, out, '"optbatch".strata 13', "use strata <= 12"))
