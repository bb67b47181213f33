"""Where users run: mpirun (MPI discovery), a faked Slurm allocation, every ZeRO stage with OptBatch."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.dist_utils import free_port
from tests.helpers import REPO, read_jsonl

pytestmark = pytest.mark.integration

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
SMALL = ["--max-steps", "3", "--eval-samples-per-task", "1", "--eval-max-new-tokens", "4", "--no-export",
         "--log-every", "0"]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return tmp_path_factory.mktemp("launchers")  # one .optbatch_cache for all runs of this module


def _check_run(out, steps=3, b=16, c=24):
    sel = read_jsonl(out / "selection.jsonl")
    assert [l["step"] for l in sel] == list(range(1, steps + 1))
    assert all(len(l["selected"]) == b and len(l["candidates"]) == c for l in sel)
    assert (out / f"checkpoints/step_{steps:06d}/COMPLETE").exists()
    cfg = json.load(open(out / "config.json"))
    assert cfg["derived"]["world_size"] == 2


def test_mpirun_discovers_ranks(shared):
    mpirun = shutil.which("mpirun", path=os.path.dirname(sys.executable)) or shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("no mpirun (install the 'mpi' extra: mpi4py + mpich)")
    out = shared / "mpi"
    proc = subprocess.run([mpirun, "-np", "2", sys.executable, "launch/train.py", "--deepspeed",
                           "ds_configs/zero3.json", "--output-dir", str(out), *SMALL],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    _check_run(out)


def test_sbatch_script_syntax_and_fake_slurm_launch(shared):
    script = os.path.join(REPO, "launch/slurm/train.sbatch")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    out = shared / "slurm"
    env = {**ENV, "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "optbatch-test", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_CPUS_PER_TASK": "1", "CPU_RANKS_PER_NODE": "2",
           "LAUNCH": "local", "MASTER_PORT": str(free_port()), "OUTPUT": str(out), "CONFIG": "ds_configs/zero3.json",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + ENV.get("PATH", "")}
    proc = subprocess.run(["bash", script, *SMALL], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    _check_run(out)
    # requeue: the same job again resumes from its checkpoint instead of starting over
    proc = subprocess.run(["bash", script, "--max-steps", "4", *SMALL[2:]], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "resumed from" in proc.stdout + proc.stderr
    assert [l["step"] for l in read_jsonl(out / "selection.jsonl")] == [1, 2, 3, 4]


@pytest.mark.parametrize("config", ["zero2", "zero3", "zero3_offload"])
def test_every_zero_stage_trains_with_optbatch(shared, config):
    out = shared / config
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "launch/train.py", "--deepspeed", f"ds_configs/{config}.json", "--method", "optbatch",
           "--output-dir", str(out), *SMALL]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    _check_run(out)
    metrics = read_jsonl(out / "metrics.jsonl")
    assert all(sum(m["quotas"]) == 16 for m in metrics)
    assert metrics[-1]["time"]["curvature"] > 0  # Adam's second moment was read after the first step
