"""Join the process group a launcher such as torchrun describes in the environment.

Also the one place that says which process this is (:func:`world`), so that code which splits
work over processes reads the same rank and size whether or not a group was started here.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the current process group; ``(0, 1)`` when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextmanager
def process_group(backend: str = "gloo"):
    """Initialise ``torch.distributed`` from ``WORLD_SIZE``/``RANK``/``MASTER_ADDR`` when set.

    Yields ``(rank, world_size)``; a plain single-process run yields ``(0, 1)`` and does nothing.
    The group is torn down on exit (barrier first, which avoids aborts at interpreter exit).

    Args:
        backend: ``nccl`` for GPUs, ``gloo`` for CPUs (and as a fallback where NCCL times out).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 or dist.is_initialized():
        yield world()
        return
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("distributed backend 'nccl' needs CUDA devices; use 'gloo' on CPUs.")
    dist.init_process_group(backend=backend, init_method="env://")
    rank = dist.get_rank()
    logger.info("Joined process group: rank %d of %d (%s)", rank, world_size, backend)
    try:
        yield rank, world_size
        dist.barrier()
    finally:
        dist.destroy_process_group()
