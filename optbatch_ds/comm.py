"""Every collective of the package: init and cleanup, steps 3 and 5 of DESIGN §2 (gather per-sample
signals to rank 0, broadcast the choice, check agreement), and the few reductions the recipe needs.

Knows nothing of strata or losses: it moves tensors and objects, named for what they do. Every
collective runs under the process group's timeout, so a dead rank becomes an error on the others
instead of a hang. With one process (no process group) each function is the identity.
"""
from __future__ import annotations

import datetime
import hashlib
import os
import socket

import torch
import torch.distributed as dist


SETUP_TIMEOUT_S = 1800.0


class DisagreementError(RuntimeError):
    """Ranks hold different selections after the broadcast: training would silently diverge."""


def free_port() -> int:
    """A TCP port free on this host now (for a rendezvous or a launcher's --master_port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mpi_launched() -> bool:
    return any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"))


MULTI_RANK = False  # set by init_distributed: this process is one of several ranks


def init_distributed(timeout_s: float = 600.0) -> tuple[int, int, int]:
    """One init for every launcher: deepspeed, torchrun, srun (SLURM_*), mpirun (mpi4py), or none.

    Returns (rank, world_size, local_rank)."""
    import deepspeed

    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        # srun without a wrapper: translate Slurm's variables to torch's (MASTER_ADDR comes from the sbatch script)
        os.environ.setdefault("RANK", os.environ["SLURM_PROCID"])
        os.environ.setdefault("WORLD_SIZE", os.environ["SLURM_NTASKS"])
        os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
    mpi = "RANK" not in os.environ and _mpi_launched()
    if "RANK" not in os.environ and not mpi:  # plain `python launch/train.py`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    # Set-up (one rank building the default model or tokenizing a large set while the others wait,
    # DeepSpeed's first collectives) may legitimately take longer than a training collective: start
    # with a generous timeout, and the trainer tightens it with set_collective_timeout once set up.
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=mpi, verbose=False,
                               timeout=datetime.timedelta(seconds=max(timeout_s, SETUP_TIMEOUT_S)))
    rank, world = dist.get_rank(), dist.get_world_size()
    global MULTI_RANK
    MULTI_RANK = world > 1
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return rank, world, local_rank


def set_collective_timeout(seconds: float) -> None:
    """From now on a collective that waits longer than this (a dead or frozen rank) raises."""
    if not dist.is_initialized():
        return
    from torch.distributed import distributed_c10d

    # Every group, not only the default one: DeepSpeed's data-parallel and ZeRO groups were created
    # during set-up with the set-up timeout, and a frozen peer would hang their collectives for that long.
    timeout = datetime.timedelta(seconds=seconds)
    groups = list(getattr(getattr(distributed_c10d, "_world", None), "pg_map", {}) or [None])
    for group in groups:
        distributed_c10d._set_pg_timeout(timeout, group)


def cleanup() -> None:
    if not dist.is_initialized():
        return
    rank = dist.get_rank()
    dist.destroy_process_group()
    # DeepSpeed's CPU shared-memory comm op leaves its per-rank buffer in /dev/shm (about 70 MB a rank
    # a run); every peer mapped it at init, so unlinking it now is safe.
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    try:
        os.remove(name)
    except OSError:
        pass


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without a process group."""
    return _rank(), _world()


def log0(*msg) -> None:
    """Print on rank 0 only: the one place rank-0 console output goes through."""
    if _rank() == 0:
        print(*msg, flush=True)


def _world() -> int:
    """World size; 1 without a process group (a single process never initialised one)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def comm_device() -> torch.device:
    """Where tensors must live for the backend: gloo takes CPU tensors, NCCL device tensors."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_to_rank0(tensor: torch.Tensor) -> torch.Tensor | None:
    """Concatenate every rank's tensor (same shape on every rank) along dim 0 on rank 0; None elsewhere."""
    world = _world()
    dev = comm_device()
    t = tensor.detach().to(dev).contiguous()
    if world == 1:
        return t.cpu()
    parts = [torch.empty_like(t) for _ in range(world)] if _rank() == 0 else None
    dist.gather(t, gather_list=parts, dst=0)
    return torch.cat(parts).cpu() if parts is not None else None


def broadcast_from_rank0(tensor: torch.Tensor | None, shape, dtype) -> torch.Tensor:
    """Rank 0's tensor on every rank (others pass None and the expected shape/dtype)."""
    dev = comm_device()
    buf = tensor.to(dev, dtype).contiguous() if _rank() == 0 else torch.empty(shape, dtype=dtype, device=dev)
    if _world() > 1:
        dist.broadcast(buf, src=0)
    return buf.cpu()


def digest(t: torch.Tensor) -> int:
    """A 63-bit fingerprint of a tensor's bytes (to compare what ranks hold without sending it all)."""
    raw = t.detach().cpu().contiguous().numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little") >> 1


def check_agreement(t: torch.Tensor, what: str = "selected indices", step: int | None = None) -> None:
    """Raise DisagreementError on every rank if any rank's tensor differs from rank 0's."""
    world = _world()
    if world == 1:
        return
    mine = torch.tensor([digest(t)], dtype=torch.int64, device=comm_device())
    all_d = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(all_d, mine)
    values = [int(x.item()) for x in all_d]
    bad = [r for r, v in enumerate(values) if v != values[0]]
    if bad:
        where = f" at step {step}" if step is not None else ""
        raise DisagreementError(f"ranks {bad} hold different {what} than rank 0{where} "
                                f"(digests {values}); refusing to train on inconsistent batches")


def all_gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order, on every rank."""
    if _world() == 1:
        return [obj]
    out = [None] * _world()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's picklable `obj` on every rank (what the others pass is ignored)."""
    if _world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any: so every rank can stop together (a rank that stopped
    alone would leave the others hanging in their next collective)."""
    t = torch.tensor([1.0 if flag else 0.0], device=comm_device())
    if _world() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `t` over ranks, on every rank, on the CPU (float64 keeps token counts exact)."""
    if _world() == 1:
        return t.cpu()
    buf = t.to(comm_device())
    dist.all_reduce(buf)
    return buf.cpu()


def same_on_every_rank(value: int, what: str) -> int:
    """`value`, after checking every rank holds the same one (a mismatch would hang a later collective);
    raises RuntimeError on every rank otherwise, naming `what` and the range seen."""
    if _world() == 1:
        return value
    both = torch.tensor([value, -value], dtype=torch.float64, device=comm_device())
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    high, low = int(both[0]), -int(both[1])
    if high != low:
        raise RuntimeError(f"ranks disagree on {what} (between {low} and {high}): it must be the same on every rank "
                           "at this point of training")
    return value


def barrier() -> None:
    """Every rank waits for the others."""
    if _world() > 1:
        dist.barrier()
