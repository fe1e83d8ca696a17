"""Every collective the package uses, each safe in a world of one: logging from rank 0, barriers,
sums of small vectors, object broadcast and gather, and moving whole weights in and out of ZeRO-3's
partitions (rank 0 writes, every rank joins)."""

import sys

import torch

from dist_glm.errors import UserError


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
    if not trainable_only and main:
        # Persistent buffers belong to the model as much as its weights: the MoE GLMs' routers keep their
        # trained e_score_correction_bias in one, and a model saved without it routes differently.
        # ZeRO-3 does not partition buffers, so every rank holds them whole.
        for prefix, sub in module.named_modules():
            for name, buf in sub.named_buffers(recurse=False):
                if buf is not None and name not in sub._non_persistent_buffers_set:
                    out[f"{prefix}.{name}" if prefix else name] = buf.detach().cpu().clone()
    return out
