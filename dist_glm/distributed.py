"""Everything that touches process groups lives here: rank discovery, init, collectives, the DeepSpeed
config, and gathering ZeRO-3 partitioned weights for export.

Rank discovery before init reads the launcher's environment (deepspeed/torchrun set RANK, WORLD_SIZE,
LOCAL_RANK; mpirun sets OMPI_COMM_WORLD_*), so that configuration errors can be reported by rank 0
only, before any collective could hang.
"""

import json
import os
import socket
import sys
from datetime import timedelta
from pathlib import Path

import torch

from dist_glm.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DS_CONFIG = REPO_ROOT / "ds_configs" / "zero0.json"

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
    """Form the process group (gloo on CPU, nccl on GPU) after the preflight (dist_glm.preflight) and
    return (rank, world_size).

    A plain `python launch/train.py` has no launcher environment: it becomes a world of one. Under
    mpirun the ranks are known but not the rendezvous address: rank 0 picks it and MPI broadcasts it.
    """
    import logging

    import deepspeed

    from dist_glm import preflight

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


def is_main_process() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def log(msg: str) -> None:
    """One line from rank 0 (every rank computes the same things; one copy is enough)."""
    if is_main_process():
        from tqdm import tqdm

        # tqdm.write keeps a progress bar intact below the message.
        tqdm.write(f"[dist_glm] {msg}", file=sys.stdout)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(values: list[float] | torch.Tensor) -> torch.Tensor:
    """Sum a small float64 vector across ranks (token counts, loss sums): exact for integer counts."""
    t = torch.as_tensor(values, dtype=torch.float64).clone()
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        # gloo reduces CPU tensors; nccl needs them on the GPU.
        dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else t.device
        t = t.to(dev)
        torch.distributed.all_reduce(t)
    return t.cpu()


def all_gather_objects(obj) -> list:
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (a small picklable value, such as a path or an error message)."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def load_from_rank0(model: torch.nn.Module, state: dict | None) -> None:
    """Collective, before deepspeed.initialize: set the parameters named in rank 0's `state` (None on the
    other ranks) on every rank. Only rank 0 reads the weights; under ZeRO-3 each partitioned parameter is
    gathered, written by rank 0 and re-partitioned, otherwise it is broadcast."""
    import deepspeed

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    names = broadcast_object(sorted(state) if rank == 0 else None)
    params = dict(model.named_parameters())
    unknown = broadcast_object([n for n in names if n not in params] if rank == 0 else None)
    if unknown:
        raise UserError(f"{len(unknown)} weights are not in this model (e.g. {unknown[0]}); was it trained from it?")
    many = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    for name in names:
        p = params[name]
        if hasattr(p, "ds_id"):  # ZeRO-3 partitioned
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if rank == 0:
                    p.data.copy_(state[name])
            continue
        if rank == 0:
            p.data.copy_(state[name])
        if many:
            buf = p.data.to(dev)  # gloo broadcasts CPU tensors; nccl needs them on the GPU
            torch.distributed.broadcast(buf, src=0)
            p.data.copy_(buf)


def destroy() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------- DeepSpeed config

# Keys our training config owns. In a ds config they must be "auto" (or agree with ours), so that
# batch sizes, clipping and precision have one source of truth.
_OWNED_SECTIONS = ("optimizer", "scheduler")


def read_ds_config(path: str) -> dict:
    p = Path(path) if path else DEFAULT_DS_CONFIG
    if not p.is_file():
        raise UserError(f"deepspeed='{path}': file not found; use one of ds_configs/*.json or your own JSON file")
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"deepspeed='{p}': not valid JSON ({e}); fix the file") from None
    if not isinstance(cfg, dict):
        raise UserError(f"deepspeed='{p}': expected a JSON object at the top level")
    return cfg


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def is_offload(ds_config: dict) -> bool:
    z = ds_config.get("zero_optimization", {})
    return z.get("offload_optimizer", {}).get("device", "none") not in ("none", None)


def build_ds_config(train_cfg, world_size: int) -> dict:
    """Read the user's ds config and fill every "auto" from the training config.

    Raises UserError when a ds config value contradicts the training config, instead of silently
    letting one of them win (DeepSpeed-Chat's classic surprise).
    """
    path = train_cfg.deepspeed
    ds = read_ds_config(path)
    where = f"deepspeed='{path or DEFAULT_DS_CONFIG}'"
    mbs, gas = train_cfg.per_device_train_batch_size, train_cfg.gradient_accumulation_steps
    ours = {
        "train_micro_batch_size_per_gpu": mbs,
        "gradient_accumulation_steps": gas,
        "train_batch_size": train_cfg.global_batch_size(world_size),
        "gradient_clipping": train_cfg.max_grad_norm,
    }
    problems = []
    for section in _OWNED_SECTIONS:
        if section in ds:
            problems.append(
                f"{where}: remove the '{section}' section; the optimizer and schedule come from "
                "learning_rate, weight_decay, lr_scheduler_type and warmup_* in the training config"
            )
    for key, value in ours.items():
        given = ds.get(key, "auto")
        if given != "auto" and given != value:
            problems.append(
                f"{where}: {key}={given} contradicts the training config ({key}={value} from "
                f"per_device_train_batch_size={mbs} x gradient_accumulation_steps={gas} x "
                f'world_size={world_size}); set it to "auto"'
            )
        ds[key] = value
    stage = zero_stage(ds)
    if stage not in (0, 1, 2, 3):
        problems.append(f"{where}: zero_optimization.stage={stage} is not one of 0, 1, 2, 3")
    for prec, want in (("bf16", train_cfg.bf16), ("fp16", train_cfg.fp16)):
        sec = ds.setdefault(prec, {})
        enabled = sec.get("enabled", "auto")
        if enabled != "auto" and bool(enabled) != want:
            problems.append(
                f'{where}: {prec}.enabled={enabled} contradicts {prec}={want} in the training config; set it to "auto"'
            )
        sec["enabled"] = want
    # Dynamic loss scaling: DeepSpeed's knobs, "auto" (or absent) = the training config's fp16_* values.
    scaling = {
        "loss_scale": 0,  # 0 = dynamic
        "initial_scale_power": train_cfg.fp16_initial_scale_power,
        "loss_scale_window": train_cfg.fp16_loss_scale_window,
        "hysteresis": train_cfg.fp16_hysteresis,
        "min_loss_scale": train_cfg.fp16_min_loss_scale,
    }
    fp16 = ds["fp16"]
    for key, value in scaling.items():
        if fp16.get(key, "auto") == "auto":
            fp16[key] = value
    if not train_cfg.fp16:
        ds["fp16"] = {"enabled": False}
    if train_cfg.fp16 and stage == 0:
        # DeepSpeed 0.19's ZeRO-0 fp16 optimizer unscales gradients in step() but engine.backward never
        # scaled the loss for it (only ZeRO optimizers are scaled), so updates come out 2**16 too small.
        problems.append(
            f"{where}: fp16 needs zero_optimization.stage 1, 2 or 3 (DeepSpeed's ZeRO-0 fp16 path does not "
            "apply its loss scale); pass --deepspeed=ds_configs/zero1.json, the same as ZeRO-0 on one GPU"
        )
    if is_offload(ds) and stage == 0:
        problems.append(f"{where}: offload_optimizer needs zero_optimization.stage 1, 2 or 3")
    # Per-bucket sizes left as "auto" get DeepSpeed's own defaults.
    z = ds.setdefault("zero_optimization", {"stage": 0})
    for key in [k for k, v in z.items() if v == "auto"]:
        del z[key]
    ds.setdefault("steps_per_print", 10**9)  # we log ourselves; keep DeepSpeed's step log quiet
    ds.setdefault("wall_clock_breakdown", False)
    if problems:
        raise UserError(problems)
    return ds


# ---------------------------------------------------------------- ZeRO-3 aware state gathering


def gather_state_dict(module: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """Full (unpartitioned) parameters on CPU, on rank 0 (other ranks get {}). Collective: every rank
    must call it. Under ZeRO-3 each parameter is gathered in turn, so peak memory is one parameter,
    and the result is never the shape-[0] placeholder that naive `state_dict()` returns."""
    import deepspeed

    out = {}
    main = is_main_process()
    for name, param in module.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        if hasattr(param, "ds_id"):
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if main:
                    out[name] = param.detach().cpu().clone()
        elif main:
            out[name] = param.detach().cpu().clone()
    return out
