"""Run one test body on W CPU processes (gloo), the way DeepSpeed tests itself.

    results = run_distributed(body, world_size=2, args=(x,))   # body(rank, world_size, *args)

Each rank gets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT in its environment, so
`deepspeed.init_distributed(dist_backend="gloo")` or `torch.distributed.init_process_group("gloo")`
work unchanged inside the body. The body's return value (picklable) comes back in rank order, so
the test asserts what every rank saw. A rank that raises fails the test with its traceback; a hang
fails after `timeout` seconds instead of blocking CI.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import tempfile
import traceback

from optbatch_ds.comm import free_port  # noqa: F401  (tests import it from here)


def _entry(body, rank, world_size, port, args, out_path):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    try:
        result = ("ok", body(rank, world_size, *args))
    except BaseException as exc:  # report any failure to the parent with its traceback
        result = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    finally:
        try:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass
    with open(out_path, "wb") as f:
        pickle.dump(result, f)
    os._exit(0)  # skip the native teardown of torch/deepspeed (seconds per rank); the result is on disk


def run_distributed(body, world_size: int = 2, args: tuple = (), timeout: float = 300.0) -> list:
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        outs = [os.path.join(tmp, f"rank{r}.pkl") for r in range(world_size)]
        procs = [ctx.Process(target=_entry, args=(body, r, world_size, port, args, outs[r])) for r in range(world_size)]
        for p in procs:
            p.start()
        import time

        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        if hung:
            raise TimeoutError(f"ranks {hung} still running after {timeout:.0f}s (hang in a collective?)")
        results, errors = [], []
        for r, path in enumerate(outs):
            if not os.path.exists(path):
                errors.append(f"rank {r} died without a result (exit code {procs[r].exitcode})")
                continue
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status == "error":
                errors.append(f"rank {r}: {value}")
            results.append(value)
        if errors:
            raise AssertionError("\n".join(errors))
        return results
