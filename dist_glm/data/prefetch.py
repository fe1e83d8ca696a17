"""The next step's micro-batches, collated while this step computes.

Collation (Python lists -> padded tensors) is host work the accelerator would otherwise wait for at
the start of every step. One background thread builds step s+1 while step s runs; on CUDA it also pins
the tensors, so the copy to the device in dist_glm.training.step (non_blocking) overlaps with compute instead
of stalling on pageable memory. The batches are a pure function of the step (the sampler's order), so
prefetching changes when they are built, never what they hold.
"""

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch


class Prefetcher:
    def __init__(self, build: Callable[[int], list[dict]], pin: bool):
        self._build, self._pin = build, pin
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="collate")
        self._ahead: tuple[int, Future] | None = None

    def _make(self, step: int) -> list[dict]:
        batches = self._build(step)
        if self._pin:
            batches = [{k: v.pin_memory() for k, v in b.items()} for b in batches]
        return batches

    def get(self, step: int, next_step: int | None) -> list[dict]:
        """Step `step`'s micro-batches; starts building `next_step`'s (None: there is no next)."""
        if self._ahead is not None and self._ahead[0] == step:
            batches = self._ahead[1].result()  # re-raises what went wrong while building them
        else:
            batches = self._make(step)
        self._ahead = (next_step, self._pool.submit(self._make, next_step)) if next_step is not None else None
        return batches

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def pin_on(device: torch.device) -> bool:
    """Pinned host memory only helps (and only exists) with CUDA."""
    return device.type == "cuda" and torch.cuda.is_available()
