"""Ranks that die, stall or disagree: an error on every rank that is still there, never a hang.

    python -m pytest tests/faults/test_ranks.py -q

Collectives run under the process group's timeout (`--collective-timeout`, passed by
`optbatch_ds.trainer.main` to `comm.init_distributed(timeout_s)`), so a rank that is gone or stuck
becomes an exception on the others. The selection is checked after its broadcast
(`comm.check_agreement`), so ranks holding different batches stop instead of silently diverging.
"""
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.dist_utils import free_port, run_distributed
from tests.faults.test_bad_input import small_inputs
from tests.helpers import REPO, read_jsonl, train_body

TIMEOUT_S = 5.0   # the collective timeout the dead-rank test runs under
RAISE_WITHIN_S = 30.0


@pytest.fixture(scope="module")
def small_run(root):
    """--model/--data of a setup that takes about a second, so a short collective timeout measures the loop."""
    return small_inputs(root, 40)["args"]


@pytest.mark.unit
def test_collective_timeout_flag_reaches_init_distributed(monkeypatch):
    import optbatch_ds.trainer as trainer

    seen = {}

    def init_distributed(timeout_s=600.0):
        seen["t"] = timeout_s
        return 0, 1, 0

    monkeypatch.setattr(trainer.comm, "init_distributed", init_distributed)
    monkeypatch.setattr(trainer.comm, "cleanup", lambda: None)
    monkeypatch.setattr(trainer, "train", lambda run, rank, world, local_rank: seen.setdefault("run", run))
    assert trainer.main(["--collective-timeout", "7.5"]) == 0
    assert seen["t"] == 7.5 and seen["run"].collective_timeout == 7.5


def _peer_leaves_body(rank, world_size, op, how):
    import torch

    from optbatch_ds import comm

    comm.init_distributed(TIMEOUT_S)
    comm.set_collective_timeout(TIMEOUT_S)  # what the trainer does once set-up is over
    comm.barrier()  # both ranks are up and connected
    if rank == 1:
        if how == "stalls":  # alive but never joins the collective (stuck in I/O, a debugger, a deadlock)
            time.sleep(TIMEOUT_S + 3)
        return {"rank": 1}   # "exits": the process ends (the harness then tears down its process group)
    t0 = time.monotonic()
    try:
        if op == "broadcast":
            comm.broadcast_from_rank0(torch.arange(16), (16,), torch.long)
        else:
            comm.gather_to_rank0(torch.ones(12))
    except Exception as exc:  # gloo raises RuntimeError
        return {"rank": 0, "raised": type(exc).__name__, "message": str(exc), "seconds": time.monotonic() - t0}
    return {"rank": 0, "raised": None, "seconds": time.monotonic() - t0}


@pytest.mark.distributed
@pytest.mark.parametrize("op,how", [("broadcast", "stalls"), ("gather", "exits")])
def test_dead_or_stuck_rank_is_an_error_not_a_hang(op, how):
    t0 = time.monotonic()
    res = run_distributed(_peer_leaves_body, 2, args=(op, how), timeout=120)
    r0 = res[0]
    assert r0["raised"] == "RuntimeError", r0
    assert r0["seconds"] < RAISE_WITHIN_S
    if how == "stalls":  # the configured timeout, not a connection error, ends the wait
        assert r0["seconds"] >= TIMEOUT_S - 0.5 and "Timed out" in r0["message"], r0
    print(f"{op}/{how}: rank 0 raised {r0['raised']} after {r0['seconds']:.2f}s: {r0['message'][:160]} "
          f"(whole run {time.monotonic() - t0:.1f}s)")


def _disagreeing_body(rank, world_size, argv, bad_step):
    import torch

    from optbatch_ds import comm

    original = comm.broadcast_from_rank0
    index_broadcasts = [0]

    def broadcast_from_rank0(tensor, shape, dtype):
        out = original(tensor, shape, dtype)
        if dtype == torch.long:  # the selected positions (the weights follow as float32)
            index_broadcasts[0] += 1
            if rank == 1 and index_broadcasts[0] == bad_step:
                out = out.flip(0)  # same samples, different order: a different share per rank
        return out

    comm.broadcast_from_rank0 = broadcast_from_rank0
    try:
        train_body(rank, world_size, argv)
    except comm.DisagreementError as exc:
        return {"error": type(exc).__name__, "message": str(exc)}
    return {"error": None}


@pytest.mark.distributed
def test_disagreeing_broadcast_is_caught_on_every_rank(root, small_run):
    out = root / "disagree"
    argv = ["--deepspeed", "ds_configs/zero2.json", "--method", "random", "--output-dir", str(out),
            "--max-steps", "4", "--log-every", "0", "--no-export", *small_run]
    res = run_distributed(_disagreeing_body, 2, args=(argv, 2), timeout=600)
    assert [r["error"] for r in res] == ["DisagreementError"] * 2, res
    for r in res:
        assert r["message"].startswith("ranks [1] hold different selected indices than rank 0 at step 2"), r
    # step 1 trained and was logged; step 2 never trained
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1]
    print(res[0]["message"])


@pytest.mark.integration
def test_stuck_rank_stops_the_real_run_after_collective_timeout(root, small_run):
    """Two ranks of `launch/train.py` started the way srun does; rank 1 is frozen (SIGSTOP) mid-run.
    Rank 0 must leave on its own within --collective-timeout plus a margin, with a non-zero exit."""
    out = root / "stuck_rank"
    args = ["--deepspeed", "ds_configs/zero2.json", "--method", "optbatch", "--output-dir", str(out), "--max-steps",
            "12", "--log-every", "0", "--no-export", "--collective-timeout", str(TIMEOUT_S), *small_run]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    logs = [open(root / f"stuck_rank.rank{r}.log", "w+") for r in range(2)]
    procs = [subprocess.Popen([sys.executable, "launch/train.py", *args], cwd=REPO, stdout=logs[r],
                              stderr=subprocess.STDOUT, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(2)]
    try:
        deadline = time.monotonic() + 600
        while not (out / "metrics.jsonl").exists() or len(read_jsonl(out / "metrics.jsonl")) < 2:
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, "the run never reached step 2"
            time.sleep(0.02)
        procs[1].send_signal(signal.SIGSTOP)  # alive but frozen: a hung rank, not a dead one
        t0 = time.monotonic()
        code = procs[0].wait(timeout=TIMEOUT_S + RAISE_WITHIN_S)
        waited = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    logs[0].seek(0)
    log0 = logs[0].read()
    for f in logs:
        f.close()
    assert code != 0 and "Timed out" in log0, log0[-3000:]
    assert waited >= TIMEOUT_S - 0.5
    print(f"rank 1 frozen after step {len(read_jsonl(out / 'metrics.jsonl'))}: rank 0 exited {code} after "
          f"{waited:.1f}s; last line: {[l for l in log0.splitlines() if l.strip()][-1][:200]}")


def _slow_setup_body(rank, world_size, argv, setup_s):
    """Local rank 0 takes `setup_s` (> the collective timeout) to load its data, as a large dataset or the
    first build of the default model does; the others wait for it in the setup barrier."""
    import optbatch_ds.session as session
    from optbatch_ds import comm
    from optbatch_ds.config import parse_args
    from optbatch_ds.trainer import train

    if rank == 0:  # the set-up loads data through session.load_examples
        load_examples, slept = session.load_examples, []

        def slow_load_examples(*args, **kw):
            if not slept:
                slept.append(time.sleep(setup_s))
            return load_examples(*args, **kw)

        session.load_examples = slow_load_examples
    os.chdir(REPO)
    run = parse_args(argv)
    r, w, local = comm.init_distributed(run.collective_timeout)
    try:
        res = train(run, r, w, local, record_history=True)
    except RuntimeError as exc:  # gloo's timeout
        return {"error": str(exc)[:300]}
    return {"error": None, "steps": len(res["history"])}


@pytest.mark.distributed
def test_slow_setup_on_one_rank_is_not_a_dead_rank(root, small_run):
    out = root / "slow_setup"
    argv = ["--deepspeed", "ds_configs/zero2.json", "--method", "optbatch", "--output-dir", str(out), "--max-steps",
            "2", "--log-every", "0", "--no-export", "--collective-timeout", "3", *small_run]
    res = run_distributed(_slow_setup_body, 2, args=(argv, 6.0), timeout=300)
    assert [r["error"] for r in res] == [None, None], res
    assert [r["steps"] for r in res] == [2, 2]


SHM_PREFIX = "deepspeed_allreduce_buffer_"


def _shm_body(rank, world_size):
    os.environ["LOCAL_SIZE"] = str(world_size)  # what the deepspeed launcher sets when every rank is on this node
    from optbatch_ds import comm

    comm.init_distributed(60)
    suffix = f"_{os.environ['MASTER_PORT']}_{rank}"
    created = [n for n in os.listdir("/dev/shm") if n.startswith(SHM_PREFIX) and n.endswith(suffix)]
    comm.barrier()
    comm.cleanup()
    return created


@pytest.mark.distributed
def test_cleanup_releases_shared_memory():
    res = run_distributed(_shm_body, 2, timeout=120)
    created = [n for names in res for n in names]
    if not created:
        pytest.skip("DeepSpeed's CPU shm comm op is not in use here")
    left = [n for n in created if os.path.exists(os.path.join("/dev/shm", n))]
    for n in left:  # do not leave our own leak behind
        os.remove(os.path.join("/dev/shm", n))
    assert not left, f"{len(left)} buffers (69 MB each) left in /dev/shm: {left}"
