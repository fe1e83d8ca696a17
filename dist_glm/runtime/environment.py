"""Where this process stands before and while the process group forms: rank discovery from every
launcher's environment (deepspeed, torchrun, srun, mpirun), the CPU and GPU settings of a rank, and
`init_distributed` (preflight, rendezvous, DeepSpeed's own init).

Rank discovery before init reads the launcher's environment (deepspeed/torchrun set RANK, WORLD_SIZE,
LOCAL_RANK; mpirun sets OMPI_COMM_WORLD_*), so that configuration errors can be reported by rank 0
only, before any collective could hang.
"""

import os
import socket
from datetime import timedelta
from pathlib import Path

import torch

from dist_glm.errors import UserError
from dist_glm.runtime.collectives import barrier, log

_ENV_KEYS = {
    "rank": ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"),
    "world_size": ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"),
    "local_rank": ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"),
    # Ranks on this host: torchrun, mpirun (Open MPI, MPICH), srun.
    "local_world_size": ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE"),
}


def _from_env(kind: str, default: int) -> int:
    for key in _ENV_KEYS[kind]:
        if key in os.environ:
            return int(os.environ[key])
    return default


def rank_from_env() -> int:
    return _from_env("rank", 0)


def world_size_from_env() -> int:
    return _from_env("world_size", 1)


def local_rank_from_env() -> int:
    return _from_env("local_rank", 0)


def cuda_device_for(local_rank: int, visible: int, rank: int = 0) -> int:
    """The GPU index this rank uses: its local rank when it sees all of the node's GPUs (srun's default,
    the deepspeed launcher, mpirun), device 0 when the scheduler bound one GPU to each task
    (`--gpus-per-task=1`, `--gpu-bind=single:1`: every task sees its own GPU as cuda:0)."""
    if local_rank < visible:
        return local_rank
    if visible == 1:
        return 0
    raise UserError(
        f"rank {rank} ({socket.gethostname()}): local rank {local_rank} but this process sees {visible} GPUs "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start one rank per GPU and let "
        "each see either all of the node's GPUs or exactly one (srun --gpus-per-task=1)"
    )


def bind_cuda_device(rank: int) -> None:
    local = local_rank_from_env()
    index = cuda_device_for(local, torch.cuda.device_count(), rank)
    if index != local:
        # DeepSpeed picks its device (engine, zero.Init) from LOCAL_RANK itself, so it must say the index.
        os.environ["LOCAL_RANK"] = str(index)
        if "OMPI_COMM_WORLD_LOCAL_RANK" in os.environ:  # DeepSpeed asserts the two agree
            os.environ["OMPI_COMM_WORLD_LOCAL_RANK"] = str(index)
    torch.cuda.set_device(index)


def use_cpu_accelerator_if_no_gpu() -> None:
    """DeepSpeed must be told to use its CPU accelerator before it is first imported."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def quiet_other_ranks() -> None:
    """Only rank 0 talks: other ranks drop Python warnings and library info logs (errors still show).
    Called before transformers and DeepSpeed are imported, so their loggers pick it up."""
    if rank_from_env() == 0:
        return
    import warnings

    warnings.simplefilter("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _free_port(interface: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((interface, 0))
        return s.getsockname()[1]


def init_distributed(output_dir: str = "", preflight_timeout: int = 300, ddp_timeout: int = 1800) -> tuple[int, int]:
    """Form the process group (gloo on CPU, nccl on GPU) after the preflight (dist_glm.runtime.preflight) and
    return (rank, world_size).

    A plain `python launch/train.py` has no launcher environment: it becomes a world of one. Under
    mpirun the ranks are known but not the rendezvous address: rank 0 picks it and MPI broadcasts it.
    """
    import logging

    import deepspeed

    from dist_glm.runtime import preflight

    if rank_from_env() != 0:
        deepspeed.utils.logger.setLevel(logging.ERROR)  # DeepSpeed sets its logger's level on import
    if world_size_from_env() == 1 and "MASTER_ADDR" not in os.environ:
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
        )
    elif "MASTER_ADDR" not in os.environ:
        _discover_from_mpi()
    rank, world = rank_from_env(), world_size_from_env()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank_from_env()))
    if torch.cuda.is_available():
        bind_cuda_device(rank)
    store = preflight.rendezvous(rank, world, preflight_timeout)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    try:
        torch.distributed.init_process_group(
            backend, store=store, rank=rank, world_size=world, timeout=timedelta(seconds=preflight_timeout)
        )
    except RuntimeError as e:
        raise UserError(
            f"rank {rank} ({socket.gethostname()}): the {backend} process group did not connect within "
            f"{preflight_timeout} s although every rank reached the rendezvous ({str(e).strip()[:200]}); the ranks "
            "cannot open connections to each other's hosts: set GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME to the "
            "interface between the nodes and check the firewall",
            every_rank=True,
        ) from None
    # DeepSpeed wraps the group formed above (and, on CPU, sets up its shared-memory all-reduce).
    shm = torch.cuda.is_available() or world > 1 or not _skip_shm_op()
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=ddp_timeout))
    if not torch.cuda.is_available() and shm:
        _unlink_shm_allreduce_buffer()
    set_cpu_threads(world)
    preflight.check_all_reduce(rank, world, local_device(), preflight_timeout)
    if output_dir:
        preflight.check_shared_output_dir(store, rank, world, output_dir, preflight_timeout)
    # From here on a collective may legitimately wait long (rank 0 writing a checkpoint, say).
    from torch.distributed.distributed_c10d import _set_pg_timeout

    _set_pg_timeout(timedelta(seconds=ddp_timeout))
    return rank, world


def _discover_from_mpi() -> None:
    """mpirun (OpenMPI, MPICH, Intel MPI) starts the ranks but sets no MASTER_ADDR/MASTER_PORT: rank 0
    chooses its own address and a free port and MPI broadcasts them (DeepSpeed's mpi_discovery does the
    same with a fixed port, which collides when two jobs share a node)."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise UserError(
            f"launched with WORLD_SIZE={world_size_from_env()} by mpirun but MASTER_ADDR is not set and mpi4py is "
            "not installed: `pip install mpi4py` (needs an MPI compiler, e.g. Debian's libopenmpi-dev), or pass "
            "-x MASTER_ADDR=<head address> -x MASTER_PORT=<free port> to mpirun"
        ) from None
    comm = MPI.COMM_WORLD
    head = (_host_address(), _free_port("")) if comm.Get_rank() == 0 else None
    addr, port = comm.bcast(head, root=0)
    local_rank = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
    os.environ.update(
        RANK=str(comm.Get_rank()),
        WORLD_SIZE=str(comm.Get_size()),
        LOCAL_RANK=str(local_rank),
        MASTER_ADDR=addr,
        MASTER_PORT=str(port),
    )


def _host_address() -> str:
    """This host's address as other hosts reach it: the first of `hostname -I`, else the name's address."""
    import subprocess

    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return socket.gethostbyname(socket.gethostname())


def _skip_shm_op() -> bool:
    """One process on CPU has nothing to all-reduce, yet DeepSpeed would JIT-build (minutes, the first
    time) and load its shared-memory all-reduce op; marking the op unavailable makes it use plain
    torch.distributed, which for one rank does nothing. Returns whether it was skipped."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        return False
    deepspeed.ops.__compatible_ops__[builder.NAME] = False
    return True


def set_cpu_threads(world: int) -> int:
    """Intra-op threads for this rank: the cores this process may use, shared by the ranks on this host
    (ranks x threads <= cores, so 2 ranks on 2 cores do not oversubscribe), unless OMP_NUM_THREADS says
    otherwise. Logged once; returns the count."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = _from_env("local_world_size", 0) or world  # unknown: assume every rank is on this host
    if os.environ.get("OMP_NUM_THREADS"):
        threads = torch.get_num_threads()
        if threads * local > cores:
            log(f"WARNING: OMP_NUM_THREADS={threads} x {local} ranks here exceeds the {cores} cores; expect contention")
    else:
        threads = max(1, cores // max(1, local))
        torch.set_num_threads(threads)
    log(f"CPU threads per rank: {threads} ({local} rank(s) on this host, {cores} cores available)")
    return threads


def _unlink_shm_allreduce_buffer() -> None:
    """On CPU, DeepSpeed's shared-memory all-reduce gives each rank a 69 MB /dev/shm segment that it
    never unlinks: every run leaks one per rank until the machine's RAM is full. Once all ranks have
    mapped each other's segment (done inside init_distributed; the barrier makes it true for all),
    the names can go: the memory lives on while mapped and is freed when the processes exit, even if
    they are killed."""
    barrier()
    name = "deepspeed_allreduce_buffer_{}_{}_{}_{}".format(
        os.getuid(), os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"), torch.distributed.get_rank()
    )
    Path("/dev/shm", name).unlink(missing_ok=True)


def local_device() -> torch.device:
    """This rank's device: its GPU (by local rank) or the CPU."""
    return torch.device("cuda", local_rank_from_env()) if torch.cuda.is_available() else torch.device("cpu")


def destroy() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
