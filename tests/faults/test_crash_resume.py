"""Crash, interrupted save and preemption: a resumed run is the run that was never interrupted.

    python -m pytest tests/faults/test_crash_resume.py -q

The reference is one uninterrupted 2-rank run through the real `deepspeed` launcher. The same command
is then SIGKILLed (the whole process group: launcher and both ranks) at a seeded random step and resumed
with `--resume auto`, after the newest checkpoint's COMPLETE marker is deleted (an interrupted save);
and it is preempted the way Slurm does it (SIGTERM to every task, ranks started as plain processes
the way srun starts them) and resumed. Both must end with the reference's selected-index sequence and
final weights.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from optbatch_ds.checkpoint import MARKER, find_resume, latest_complete, write_complete_marker
from tests.dist_utils import free_port
from tests.faults.test_bad_input import small_inputs
from tests.helpers import REPO, load_safetensors, read_jsonl

_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
ENV = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}  # one process, unless a test says otherwise
ENV.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
MAX_STEPS, SAVE_EVERY = 10, 2
# ZeRO-3, the shipped default. ZeRO-2 cannot resume an optbatch run yet: see test_zero2_resume_reads_curvature.
KILL_SEED = 2024
RUN_TIMEOUT = 600


@pytest.fixture(scope="module")
def data_args(root):
    # 200 demo records (8 steps of 24 candidates per epoch: the runs cross an epoch boundary) and the
    # built-in model: a setup of seconds, no held-out set to evaluate.
    return small_inputs(root, 200)["args"]


def _args(out, data_args, *extra, config="zero3", max_steps=MAX_STEPS, save_every=SAVE_EVERY):
    return ["--deepspeed", f"ds_configs/{config}.json", "--method", "optbatch", "--save-every", str(save_every),
            "--max-steps", str(max_steps), "--output-dir", str(out), "--log-every", "0", *data_args, *extra]


_LAUNCHER_PORTS = []


def _launcher(*args):
    port = free_port()
    _LAUNCHER_PORTS.append(port)
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
            "launch/train.py", *args]


@pytest.fixture(scope="module", autouse=True)
def _release_shared_memory():
    """Under the launcher DeepSpeed's CPU comm op leaves a 69 MB /dev/shm buffer per rank and run (see
    test_ranks.test_cleanup_releases_shared_memory); remove the ones our runs made."""
    yield
    for port in _LAUNCHER_PORTS:
        for rank in range(2):
            path = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{rank}"
            if os.path.exists(path):
                os.remove(path)


def _run(cmd, log_path):
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT)
    return proc.returncode, open(log_path).read()


def _steps_logged(out) -> int:
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    with open(path) as f:
        return sum(1 for l in f if l.endswith("\n"))


def _wait_for_steps(procs, out, n, timeout=RUN_TIMEOUT):
    deadline = time.monotonic() + timeout
    while _steps_logged(out) < n:
        assert all(p.poll() is None for p in procs), f"the run ended before step {n}"
        assert time.monotonic() < deadline, f"no step {n} after {timeout}s"
        time.sleep(0.02)


def _assert_same_run(reference, out):
    ref_sel, sel = read_jsonl(reference / "selection.jsonl"), read_jsonl(out / "selection.jsonl")
    assert [l["step"] for l in sel] == list(range(1, MAX_STEPS + 1))
    assert [l["selected"] for l in sel] == [l["selected"] for l in ref_sel]
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == list(range(1, MAX_STEPS + 1))
    want, got = load_safetensors(reference / "final"), load_safetensors(out / "final")
    assert set(want) == set(got)
    worst = max(float((want[k].float() - got[k].float()).abs().max()) for k in want)
    assert worst <= 1e-6, f"final weights differ by {worst}"
    return worst


@pytest.fixture(scope="module")
def reference(root, data_args):
    out = root / "crash_reference"
    rc, log = _run(_launcher(*_args(out, data_args)), root / "crash_reference.log")
    assert rc == 0, log[-4000:]
    return out


# ---------------------------------------------------------------------------- completeness markers

@pytest.mark.unit
def test_latest_complete_skips_tags_without_marker(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints"
    assert latest_complete(str(ckpt)) is None and find_resume("auto", str(ckpt)) is None
    for step in (2, 4, 6, 10):
        (ckpt / f"step_{step:06d}").mkdir(parents=True)
    for step in (2, 4):
        write_complete_marker(str(ckpt / f"step_{step:06d}"), step)
    (ckpt / "step_000010" / (MARKER + ".tmp")).write_text("{}")  # killed before the atomic rename
    (ckpt / "latest").write_text("step_000010")                   # DeepSpeed's own pointer is not trusted
    (ckpt / "step_000099_old").mkdir()                            # not a tag
    assert latest_complete(str(ckpt)) == str(ckpt / "step_000004")
    assert find_resume("auto", str(ckpt)) == str(ckpt / "step_000004")
    assert find_resume(None, str(ckpt)) is None
    assert find_resume(str(tmp_path / "run"), str(ckpt)) == str(ckpt / "step_000004")  # a run dir
    assert find_resume(str(ckpt), str(ckpt)) == str(ckpt / "step_000004")              # its checkpoints dir
    with pytest.raises(FileNotFoundError, match="COMPLETE marker"):
        find_resume(str(ckpt / "step_000006"), str(ckpt))
    assert json.load(open(ckpt / "step_000004" / MARKER))["step"] == 4
    # tags compare as numbers, so a step past 999999 (7 digits) still counts as the newest
    (ckpt / "step_1000000").mkdir()
    write_complete_marker(str(ckpt / "step_1000000"), 1000000)
    assert latest_complete(str(ckpt)) == str(ckpt / "step_1000000")


# ---------------------------------------------------------------------------- SIGKILL, then --resume auto

@pytest.mark.integration
def test_sigkill_then_resume_auto_repeats_the_uninterrupted_run(root, reference, data_args):
    kill_at = random.Random(KILL_SEED).randint(3, 8)
    out = root / "crash_killed"
    with open(root / "crash_killed.log", "w") as log:
        proc = subprocess.Popen(_launcher(*_args(out, data_args)), cwd=REPO, env=ENV, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for_steps([proc], out, kill_at)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, mid-step
            proc.wait()
    logged = _steps_logged(out)
    ckpt = out / "checkpoints"
    complete = sorted(t.name for t in ckpt.iterdir() if t.name.startswith("step_") and (t / MARKER).exists())
    assert complete and complete[-1] <= f"step_{logged:06d}", (complete, logged)
    # an interrupted save: the newest tag lost its marker, so resume must take the one before it
    os.remove(ckpt / complete[-1] / MARKER)
    expected = str(ckpt / complete[-2]) if len(complete) > 1 else None
    assert find_resume("auto", str(ckpt)) == expected

    rc, log = _run(_launcher(*_args(out, data_args, "--resume", "auto")), root / "crash_resumed.log")
    assert rc == 0, log[-4000:]
    if expected is not None:
        assert f"resumed from {expected} at step {int(expected[-6:])}" in log, log[-4000:]
    else:
        assert "resumed from" not in log
    worst = _assert_same_run(reference, out)
    print(f"killed at step {logged} (aimed at {kill_at}); complete tags {complete}; "
          f"dropped marker of {complete[-1]}; resumed from {expected}; max |dw| {worst:.2e}")


# ---------------------------------------------------------------------------- SIGTERM (Slurm preemption)

def _start_plain_ranks(args, log_prefix):
    """Start 2 ranks the way srun does: the same command twice, rank and rendezvous in the environment."""
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {**ENV, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port}
        log = open(f"{log_prefix}.rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "launch/train.py", *args], cwd=REPO, env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
        log.close()
    return procs


def _wait_all(procs, timeout=RUN_TIMEOUT):
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.mark.integration
def test_sigterm_saves_exits_zero_and_resumes(root, reference, data_args):
    out = root / "preempted"
    prefix = str(root / "preempted")
    procs = _start_plain_ranks(_args(out, data_args), prefix)
    try:
        _wait_for_steps(procs, out, 3)
        for p in procs:  # srun sends SIGTERM to every task
            p.send_signal(signal.SIGTERM)
    finally:
        codes = _wait_all(procs)
    logs = [open(f"{prefix}.rank{r}.log").read() for r in range(2)]
    assert codes == [0, 0], (codes, logs[0][-3000:], logs[1][-3000:])
    last = read_jsonl(out / "metrics.jsonl")[-1]["step"]
    assert 3 <= last < MAX_STEPS
    tag = out / "checkpoints" / f"step_{last:06d}"
    assert (tag / MARKER).exists() and latest_complete(str(out / "checkpoints")) == str(tag)
    assert f"SIGTERM: saved {tag} at step {last}" in logs[0]
    assert not (out / "final").exists()

    procs = _start_plain_ranks(_args(out, data_args, "--resume", "auto"), prefix + "_resumed")
    codes = _wait_all(procs)
    logs = [open(f"{prefix}_resumed.rank{r}.log").read() for r in range(2)]
    assert codes == [0, 0], (codes, logs[0][-3000:], logs[1][-3000:])
    assert f"resumed from {tag} at step {last}" in logs[0]
    worst = _assert_same_run(reference, out)
    print(f"SIGTERM after step 3 was logged: saved at step {last}, both ranks exit 0; resumed to {MAX_STEPS}; "
          f"max |dw| vs uninterrupted {worst:.2e}")


# ---------------------------------------------------------------------------- ZeRO-2 resume (known bug)

@pytest.mark.integration
def test_zero2_resume_reads_curvature(root, data_args):
    """One process, ZeRO-2: 3 steps straight, then the same 3 steps resumed from the step-2 checkpoint."""
    import shutil

    full, part = root / "zero2_full", root / "zero2_resumed"
    one = [sys.executable, "launch/train.py"]
    rc, log = _run([*one, *_args(full, data_args, "--no-export", config="zero2", max_steps=3)], root / "zero2_full.log")
    assert rc == 0, log[-3000:]
    shutil.copytree(full / "checkpoints" / "step_000002", part / "checkpoints" / "step_000002")
    rc, log = _run([*one, *_args(part, data_args, "--no-export", "--resume", "auto", config="zero2", max_steps=3)],
                   root / "zero2_resumed.log")
    assert "TypeError" not in log and rc == 0, log[-3000:]
    want, got = read_jsonl(full / "metrics.jsonl")[-1], read_jsonl(part / "metrics.jsonl")[-1]
    assert want["step"] == got["step"] == 3
    for key in ("loss", "diversity_kept", "mean_loss_selected"):  # diversity_kept sees the curvature
        assert abs(want[key] - got[key]) <= 1e-6 * max(1.0, abs(want[key])), key
    assert read_jsonl(full / "selection.jsonl")[-1]["selected"] == read_jsonl(part / "selection.jsonl")[-1]["selected"]
