"""Training checkpoints: `output_dir/checkpoint-STEP/`.

A checkpoint is written into `checkpoint-STEP.tmp/` and renamed once every rank has finished, so a
crash mid-save can never leave a directory that looks complete: `checkpoint-STEP` exists only whole.
Before the rename every file is fsynced and `manifest.json` (each file's size) is written last, so a
checkpoint damaged later (a truncated copy, a disk error) is recognised: auto-resume skips it with a
warning and takes the previous complete one; naming it explicitly is an error that names the file.
Contents: DeepSpeed's engine state under `deepspeed/` (module, optimizer partitions, lr scheduler),
`rng_state_RANK.pt` per rank, `trainer_state.json` (step, best eval loss, patience, world size, global
batch) and the resolved `config.yaml`. The data position needs no saving: the sampler derives it from
the step.

A checkpoint written by N ranks resumes on M: DeepSpeed's optimizer partitions are per rank, so the
first M-rank resume converts them once into a universal checkpoint (`universal/` beside `deepspeed/`,
DeepSpeed's ds_to_universal) and loads that. The global batch must stay the same (raise
gradient_accumulation_steps when ranks go away) so that the data order and schedule continue exactly.
"""

import errno
import gc
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from dist_glm.checkpointing import safe_load
from dist_glm.checkpointing.trainer_state import TrainerState, state_file_problem
from dist_glm.config import save_config
from dist_glm.errors import UserError
from dist_glm.runtime import collectives

TAG = "deepspeed"
UNIVERSAL_TAG = "universal"
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
# Written first into every checkpoint directory (and kept): what lets a later save or a failed one delete
# a leftover `checkpoint-N.tmp` or replace `checkpoint-N`, knowing dist_glm wrote it. A directory of that
# name without it (or a trainer state) is someone else's and is never deleted.
OURS_FILE = ".dist_glm_checkpoint"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in d.iterdir()
        if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file() and is_ours(p)
    ]
    return sorted(found)


def damage(path: Path) -> str | None:
    """What is wrong with a checkpoint, or None: its trainer state must parse with the right types, and
    every file its manifest lists must be there at its recorded size (checkpoints written before
    manifests existed are taken as they are). Every file a checkpoint is judged by is validated here, so
    a corrupt one is skipped by `auto` like a truncated one, never a traceback."""
    state = path / STATE_FILE
    try:
        problem = state_file_problem(json.loads(state.read_text(encoding="utf-8")))
    except (ValueError, UnicodeDecodeError, RecursionError):
        problem = "not valid JSON"
    except OSError as e:
        problem = e.strerror or str(e)
    if problem is not None:
        return f"{state} is unreadable ({problem})"
    manifest = path / MANIFEST_FILE
    if not manifest.is_file():
        return None
    try:
        sizes = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
        return f"{manifest} is unreadable"
    if not isinstance(sizes, dict) or not all(
        isinstance(n, str) and isinstance(v, int) and not isinstance(v, bool) for n, v in sizes.items()
    ):
        return f"{manifest} is unreadable (its files are not a map of names to sizes)"
    for name, size in sizes.items():
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != size:
            return f"{f} is {f.stat().st_size} bytes where {size} were written"
    return None


def resolve_resume_path(spec: str, output_dir: str, warn=print) -> Path | None:
    """'' -> None; 'auto' -> the latest complete, undamaged checkpoint in output_dir (or None), with a
    warning for each damaged newer one it passes over; a path -> that path, if whole."""
    if not spec:
        return None
    if spec == "auto":
        for _, path in reversed(list_checkpoints(output_dir)):
            problem = damage(path)
            if problem is None:
                safe_load.check_dir(path, "resume_from_checkpoint=auto")
                return path
            warn(f"WARNING: skipping damaged checkpoint {path.name} ({problem}); trying the one before it")
        return None
    p = Path(spec)
    if not (p / STATE_FILE).is_file():
        found = [str(c) for _, c in list_checkpoints(output_dir)]
        choices = f"one of {', '.join(found)}" if found else f"'auto' (output_dir '{output_dir}' has none yet)"
        raise UserError(
            f"resume_from_checkpoint='{spec}': not a complete checkpoint directory (no {STATE_FILE}); use {choices}"
        )
    problem = damage(p)
    if problem is not None:
        raise UserError(
            f"resume_from_checkpoint='{spec}' is damaged: {problem}; pass another checkpoint, or 'auto' for the "
            "newest undamaged one"
        )
    safe_load.check_dir(p, f"resume_from_checkpoint='{spec}'")
    return p


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal(tmp: Path) -> None:
    """Rank 0, once every rank's files are written: fsync each file and the directory (a power loss after
    the rename must not leave a checkpoint of empty files), then record each file's size in the
    manifest, written and fsynced last."""
    files = sorted(f for f in tmp.rglob("*") if f.is_file())
    for f in files:
        _fsync(f)
    sizes = {str(f.relative_to(tmp)): f.stat().st_size for f in files}
    (tmp / MANIFEST_FILE).write_text(json.dumps({"files": sizes}, indent=1))
    _fsync(tmp / MANIFEST_FILE)
    for d in sorted({f.parent for f in files} | {tmp}):
        _fsync(d)


def _rng_state() -> dict:
    # Tensors and plain numbers only, so that resume reads it with weights_only=True (dist_glm.checkpointing.safe_load).
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state[1], torch.Tensor):
        numpy_state = (numpy_state[0], numpy_state[1].numpy().astype(np.uint32), *numpy_state[2:])
    np.random.set_state(tuple(numpy_state))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


class SaveFailed(Exception):
    """A checkpoint could not be written (full disk, quota, permissions); every rank raises it together.
    The message is empty on ranks with nothing to add, so that the reason is printed once."""


def save_checkpoint(engine, cfg, state: TrainerState, trainable_only: bool, total_steps: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path. A write that fails on any
    rank (ENOSPC, EDQUOT, EACCES) fails the save on all of them together (no rank is left waiting in a
    collective), removes the partial checkpoint and leaves the older ones as they were."""
    out = Path(cfg.train.output_dir)
    step = state.global_step
    final, tmp = out / f"checkpoint-{step}", out / f"checkpoint-{step}.tmp"
    rank = torch.distributed.get_rank()

    def start() -> None:
        if rank == 0:
            if tmp.exists() and is_ours(tmp):
                shutil.rmtree(tmp)  # leftover of a save that crashed earlier
            tmp.mkdir(parents=True)  # FileExistsError for a directory of that name dist_glm did not write
            (tmp / OURS_FILE).write_text("")

    def write() -> None:
        try:
            # Frozen base weights are not saved for adapter methods: they are reloaded from the base model.
            engine.save_checkpoint(str(tmp), tag=TAG, exclude_frozen_parameters=trainable_only)
        except (OSError, RuntimeError) as e:
            if not _write_error(e):
                raise
            # The ranks whose files were written wait in DeepSpeed's closing barrier (its only collective
            # after the writes begin): join it, so that every rank reaches the agreement below.
            collectives.barrier()
            raise
        torch.save(_rng_state(), tmp / f"rng_state_{rank}.pt")
        if rank == 0:
            t, world = cfg.train, torch.distributed.get_world_size()
            # The layout is what a resume on a different world size must know (choose_resume_tag).
            layout = {"world_size": world, "global_batch": t.global_batch_size(world), "total_steps": total_steps}
            (tmp / STATE_FILE).write_text(json.dumps({**state.to_dict(), **layout}, indent=2))
            save_config(cfg, tmp / "config.yaml")

    def publish() -> None:
        # Rank 0, once every rank's files are on disk: seal (fsync, manifest last), then the rename that
        # makes the checkpoint count.
        if rank == 0:
            seal(tmp)
            if final.exists():
                if not is_ours(final):
                    raise FileExistsError(errno.EEXIST, "a directory dist_glm did not write is in the way", str(final))
                shutil.rmtree(final)
            tmp.rename(final)
            _fsync(out)  # the rename itself survives a power loss

    for phase in (start, write, publish):
        error = None
        try:
            phase()
        except (OSError, RuntimeError) as e:
            if not _write_error(e):
                raise
            error = e
        failed = collectives.all_reduce_sum(
            [1.0 if r == rank and error else 0.0 for r in range(torch.distributed.get_world_size())]
        )
        if failed.any():
            raise _save_failed(out, tmp, final.name, error, [r for r, f in enumerate(failed.tolist()) if f], rank)
    if rank == 0:
        prune_checkpoints(out, cfg.train.save_total_limit)
    collectives.barrier()
    return final


def is_ours(path: Path) -> bool:
    """Whether dist_glm wrote this checkpoint directory: its marker, or for checkpoints from before the
    marker existed, its DeepSpeed tag folder. A trainer_state.json alone is not enough: HF Trainer's and
    LLaMA-Factory's checkpoint-N directories have one too, and are never ours to prune or replace."""
    return (path / OURS_FILE).is_file() or (path / TAG).is_dir()


def foreign_leftovers(output_dir: str) -> list[str]:
    """Before launch: `checkpoint-N` and `checkpoint-N.tmp` directories in output_dir that dist_glm did not
    write (a save would have to replace them, and never will)."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    return [
        f"output_dir='{output_dir}': '{p.name}' was not written by dist_glm, and a checkpoint save would need its "
        "name; move it out of output_dir"
        for p in sorted(d.glob("checkpoint-*"))
        if p.is_dir() and (_NAME.match(p.name) or p.name.endswith(".tmp")) and not is_ours(p)
    ]


def _write_error(e: Exception) -> bool:
    """torch.save reports a full disk as a RuntimeError of its zip writer ("unexpected pos ..."), not an
    OSError."""
    return isinstance(e, OSError) or "inline_container" in str(e) or "PytorchStreamWriter" in str(e)


def release_files(error: BaseException) -> None:
    """Close the files a failed write left open. The failed writer's open file (held by the traceback's
    frames) keeps its blocks in use on a full disk until it is closed, so this comes before measuring and
    freeing space. Every exception of the chain: torch.save's zip writer fails once in the write and again
    closing the file, and the first failure (the second's __context__) holds the frame with the writer."""
    chain = [error]
    while chain:
        e = chain.pop()
        e.__traceback__ = None
        chain += [c for c in (e.__context__, e.__cause__) if c is not None and c.__traceback__ is not None]
    gc.collect()


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def _save_failed(out: Path, tmp: Path, name: str, error: Exception | None, ranks: list[int], rank: int) -> SaveFailed:
    """Collective: rank 0 removes the partial checkpoint; the failing ranks and rank 0 say what happened
    (how much space a checkpoint needs, what is free, what is intact), the others nothing."""
    if error is not None:
        release_files(error)
    collectives.barrier()
    written = _bytes(tmp) if rank == 0 else 0
    if rank == 0 and is_ours(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
    collectives.barrier()
    if error is None and rank != 0:
        return SaveFailed("")
    older = list_checkpoints(str(out))
    mib = 1024**2
    if older:
        need = f"a checkpoint of this run takes {_bytes(older[-1][1]) / mib:.1f} MiB ({older[-1][1].name})"
        intact = f"{', '.join(p.name for _, p in older)} intact"
    else:
        need = f"this checkpoint needs more than the {written / mib:.1f} MiB written before it failed"
        intact = "no earlier checkpoint"
    free = shutil.disk_usage(out).free / mib if out.is_dir() else 0.0
    if error is None:
        what = f"a write failed on rank(s) {', '.join(map(str, ranks))}"
    elif isinstance(error, OSError):
        what = (error.strerror or str(error)) + (f" ({error.filename})" if error.filename else "")
    else:  # torch's zip writer says only "unexpected pos N vs M" when the filesystem refuses a write
        what = f"a file could not be written ({str(error).splitlines()[0].split('] ')[-1].strip(' .')})"
    return SaveFailed(
        f"rank {rank}: saving {name} failed: {what}; {need}, {free:.1f} MiB free under {out}; the partial checkpoint "
        f"was removed, {intact}. Free space (or lower save_total_limit, or move output_dir), then rerun with "
        "--resume_from_checkpoint=auto"
    )


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    if keep <= 0:
        return
    for _, path in list_checkpoints(str(output_dir))[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def choose_resume_tag(path: Path, cfg, world: int, ds_config: dict) -> str:
    """Collective, before deepspeed.initialize. Returns the tag to load: the checkpoint as written, or
    (world size changed, optimizer state partitioned) its universal conversion, which rank 0 makes once
    and `ds_config` is switched to load."""
    state = json.loads((path / STATE_FILE).read_text())
    saved_world = state.get("world_size", world)
    t = cfg.train
    global_batch = t.global_batch_size(world)
    if state.get("global_batch", global_batch) != global_batch:
        old = state["global_batch"]
        raise UserError(
            f"resume_from_checkpoint='{path}': it was trained with a global batch of {old} samples ({saved_world} "
            f"ranks) but this run's is {global_batch} (per_device_train_batch_size={t.per_device_train_batch_size} "
            f"x gradient_accumulation_steps={t.gradient_accumulation_steps} x {world} ranks); keep it at {old} "
            "(e.g. raise gradient_accumulation_steps when there are fewer ranks) so data order and schedule continue"
        )
    partitioned = any((path / TAG).glob("*zero_pp_rank_*"))
    if saved_world == world or not partitioned:
        return TAG
    universal = path / UNIVERSAL_TAG
    if torch.distributed.get_rank() == 0 and not universal.is_dir():
        _convert_to_universal(path / TAG, universal)
    collectives.barrier()
    if not universal.is_dir():  # rank 0 failed and said why; the others stop here too
        raise UserError(f"resume_from_checkpoint='{path}': converting it for {world} ranks failed (see rank 0)")
    ds_config.setdefault("checkpoint", {})["load_universal"] = True
    return UNIVERSAL_TAG


def _convert_to_universal(src: Path, dst: Path) -> None:
    """DeepSpeed's converter, in a child process (it starts worker pools); written to a .tmp sibling and
    renamed, so a crash never leaves a half conversion that looks complete."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src)]
    cmd += [
        "--output_folder",
        str(tmp),
        "--num_extract_workers",
        "1",
        "--num_merge_workers",
        "1",
        "--inject_missing_state",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        print(f"[dist_glm] universal conversion of {src} failed: {tail[0]}", file=sys.stderr)
        return
    tmp.rename(dst)


def saved_total_steps(path: Path) -> int | None:
    """The schedule length the checkpoint's run had (None: written before it was recorded)."""
    return json.loads((path / STATE_FILE).read_text()).get("total_steps")


def load_checkpoint(engine, path: Path, trainable_only: bool, tag: str = TAG) -> tuple[TrainerState, int]:
    """Restore engine, optimizer, scheduler and this rank's RNG; return the trainer state and the world
    size that wrote the checkpoint."""
    load_path, _ = engine.load_checkpoint(
        str(path),
        tag=tag,
        load_module_strict=not trainable_only,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if load_path is None:
        raise UserError(f"resume_from_checkpoint='{path}': DeepSpeed found no engine state under {path / tag}")
    rank = torch.distributed.get_rank()
    rng_file = path / f"rng_state_{rank}.pt"
    if rng_file.is_file():
        _set_rng_state(safe_load.load(rng_file))
    saved = json.loads((path / STATE_FILE).read_text())
    return TrainerState.from_dict(saved), saved.get("world_size", torch.distributed.get_world_size())
