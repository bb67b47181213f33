"""launch/bench.py end to end: a micro-grid through the real deepspeed launcher, its outputs, resume, bad specs."""
import csv
import json
import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
GRID = ["--methods", "random,optbatch", "--ratios", "0.3", "--seeds", "1", "--max-steps", "4", "--eval-every", "2",
        "--eval-samples-per-task", "2", "--nproc", "2"]
RUNS = ("random_a0.30_s0", "optbatch_a0.30_s0")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bench(*args, timeout=600):
    proc = subprocess.run([sys.executable, "launch/bench.py", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    t0 = time.time()
    rc, log = bench(*GRID, "--out", str(out), "--", "--eval-max-new-tokens", "8")
    return out, rc, log, time.time() - t0


def test_micro_grid_writes_every_output(grid):
    out, rc, log, seconds = grid
    assert rc == 0, log[-4000:]
    # the plan comes first, then one progress line per finished run
    assert log.index("estimated time") < log.index("[1/2]") < log.index("[2/2]")
    assert "2/2 runs ok" in log
    for name in RUNS:
        run = out / "runs" / name
        for f in ("eval.json", "eval_history.jsonl", "metrics.jsonl", "config.json", "log.txt", "bench_status.json"):
            assert (run / f).exists(), f"{name}/{f}"
        assert not (run / "checkpoints").exists()  # dropped after success unless --keep-checkpoints

    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == list(RUNS)
    tasks = ("dialogue", "qa", "translation")
    for col in ["method", "prune_ratio", "seed", "status", "heldout_loss", "em_mean", "bleu4_mean", "rougeL_mean",
                "samples_trained", "flops", "wall_s", "time_train", "time_select", "time_score_forward"] + \
               [f"{m}_{t}" for m in ("em", "bleu4", "rougeL") for t in tasks]:
        assert col in rows[0], col
    for r in rows:
        assert r["status"] == "ok"
        assert float(r["heldout_loss"]) > 0 and int(r["samples_trained"]) == 4 * 16
        assert float(r["flops"]) > 0 and float(r["wall_s"]) > 0
    by_method = {r["method"]: r for r in rows}
    # optbatch scores its candidates (a forward each), random does not: more FLOPs, same samples trained
    assert float(by_method["optbatch"]["flops"]) > float(by_method["random"]["flops"])

    res = json.load(open(out / "results.json"))
    assert {s["label"] for s in res["summary"]} == {"random", "optbatch"}
    assert all(len(r["history"]) == 2 for r in res["runs"])  # eval at step 2 and the final one at step 4
    md = (out / "results.md").read_text()
    assert "| method | α | ok | held-out loss | EM |" in md
    assert "| random | 0.30 | 1/1 |" in md and "| optbatch | 0.30 | 1/1 |" in md
    for png in ("quality_vs_ratio.png", "quality_vs_time.png"):
        data = (out / png).read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC), png
    print(f"micro-grid took {seconds:.0f} s")


def test_second_invocation_skips_finished_runs(grid):
    out, rc, log, _ = grid
    assert rc == 0, log[-4000:]
    stamps = {n: os.path.getmtime(out / "runs" / n / "eval.json") for n in RUNS}
    t0 = time.time()
    rc, log = bench(*GRID, "--out", str(out), "--", "--eval-max-new-tokens", "8", timeout=120)
    assert rc == 0, log[-4000:]
    assert "2 finished run(s) skipped, 0 to run" in log
    assert log.count("done (skip)") == 2 and "[1/" not in log
    assert stamps == {n: os.path.getmtime(out / "runs" / n / "eval.json") for n in RUNS}
    assert time.time() - t0 < 60  # no training run was started
    with open(out / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 2


def test_report_only_tabulates_finished_runs_of_a_wider_plan(grid):
    out, rc, log, _ = grid
    assert rc == 0, log[-4000:]
    wider = ["--methods", "random,optbatch,ccs", "--ratios", "0.3,0.7", "--seeds", "2", "--max-steps", "4",
             "--nproc", "2", "--out", str(out), "--report-only"]
    t0 = time.time()
    rc, log = bench(*wider, timeout=120)
    assert rc == 0, log[-4000:]
    assert "report over 2 finished of 12 planned runs" in log and time.time() - t0 < 60
    with open(out / "results.csv", newline="") as f:
        assert sorted(r["run"] for r in csv.DictReader(f)) == sorted(RUNS)


def test_jobs_run_concurrently_on_one_rank_each(tmp_path):
    """--jobs 2 --nproc 1: both runs in flight at once, one thread each, same global batch as 2 ranks."""
    out = tmp_path / "jobs"
    rc, log = bench("--methods", "full,optbatch", "--ratios", "0.3", "--seeds", "1", "--max-steps", "3",
                    "--eval-every", "0", "--eval-samples-per-task", "2", "--nproc", "1", "--jobs", "2",
                    "--deepspeed", "ds_configs/bench_1rank.json", "--out", str(out), "--", "--eval-max-new-tokens", "4")
    assert rc == 0, log[-4000:]
    assert "2 runs at a time, 1 rank(s) x 1 thread(s) each" in log and "2/2 runs ok" in log
    spans = []
    for name in ("full_a0.00_s0", "optbatch_a0.30_s0"):
        st = json.load(open(out / "runs" / name / "bench_status.json"))
        assert st["status"] == "ok" and st["threads_per_rank"] == 1
        spans.append((st["started_unix"], st["started_unix"] + st["elapsed_s"]))
    (a0, a1), (b0, b1) = spans
    assert max(a0, b0) < min(a1, b1), f"runs did not overlap: {spans}"
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["samples_trained"]) for r in rows] == [3 * 16, 3 * 16]
    assert [int(r["train_batch_size"]) for r in rows] == [16, 16]


@pytest.mark.parametrize("methods,message", [
    ("random,optbaatch", "'optbaatch' is not a method; did you mean 'optbatch'?"),
    ("random,optbatch:strat=1", "unknown key 'strat'; did you mean 'strata'?"),
    ("optbatch:within=nearest", "'nearest' is not one of farthest, random, top"),
    ("optbatch:strata", "is not key=value"),
])
def test_bad_methods_fail_before_any_run(tmp_path, methods, message):
    rc, log = bench("--methods", methods, "--ratios", "0.3", "--seeds", "1", "--max-steps", "2",
                    "--out", str(tmp_path / "out"), timeout=60)
    assert rc == 2, log[-2000:]
    assert message in log
    assert log.strip().splitlines()[-1].startswith("error:")  # one clear line, no traceback
    assert not (tmp_path / "out").exists()
