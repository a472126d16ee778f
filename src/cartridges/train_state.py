"""Resumable training state: which run a checkpoint belongs to, and saving and restoring it.

A checkpoint holds the student's trainable tensors, the optimiser and the number of steps done,
written whole or not at all (:class:`~cartridges.storage.Location`: a local rename, or one upload
to an object store), so a run killed mid-write leaves the previous checkpoint whole, and a run on
another machine sharing the store resumes from it. It is restored only by a run with the same key
(parameters, kind of student, initial tensors, data): a run that changed anything starts afresh
rather than continuing another run's optimisation. When to checkpoint is the loop's business
(``cartridges.training``); what the tensors mean is the student's (``cartridges.objective``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING

import torch

from cartridges.batching import Example
from cartridges.objective import Student
from cartridges.storage import Location

if TYPE_CHECKING:
    from cartridges.training import TrainConfig

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"

Where = str | os.PathLike | Location  # a local folder, a URL, or a location in a store


def run_key(config: TrainConfig, student: Student, examples: Sequence[Example]) -> str:
    """Identifies a run: a checkpoint is resumed only by a run with the same key.

    Lazy examples contribute their fingerprint (shard footers and samples, conversation ids
    and lengths), so that computing the key never reads every target from disk.
    """
    digest = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode())
    digest.update(type(student).__name__.encode())
    for tensor in student.trainable():
        # Every byte and the shape: a size sweep's cartridges start from more of the same text,
        # so their leading bytes agree (hashing is ~1 s per GB, once per run).
        digest.update(repr(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy())  # no extra copy
    fingerprint = getattr(examples, "fingerprint", None)
    if fingerprint is not None:
        digest.update(fingerprint().encode())
    else:
        for example in examples:
            digest.update(example.token_ids.numpy().tobytes())
            digest.update(example.teacher_logprobs.numpy().tobytes())
    return digest.hexdigest()[:16]


def saved_state(directory: Where | None) -> Location | None:
    """The checkpoint file in ``directory``, if one has been written."""
    path = Location.of(directory) / STATE_FILE if directory is not None else None
    return path if path is not None and path.is_file() else None


def save_state(
    directory: Where, key: str, step: int, student: Student, optimizer: torch.optim.Optimizer
) -> None:
    """Atomically write everything needed to resume after ``step`` optimiser steps."""
    state = {
        "key": key,
        "step": step,
        "trainable": [tensor.detach().cpu() for tensor in student.trainable()],
        "optimizer": optimizer.state_dict(),
    }
    with (Location.of(directory) / STATE_FILE).write_file() as temporary:
        torch.save(state, temporary)


def load_state(
    directory: Where, key: str, student: Student, optimizer: torch.optim.Optimizer
) -> int:
    """Restore a matching checkpoint into ``student`` and ``optimizer``; return its step."""
    path = saved_state(directory)
    if path is None:
        return 0
    with path.local_copy() as local:
        state = torch.load(local, map_location="cpu", weights_only=True)
    if state["key"] != key:
        logger.warning("Ignoring checkpoint %s: it belongs to a different run.", path)
        return 0
    shapes = [tuple(t.shape) for t in student.trainable()]
    saved_shapes = [tuple(t.shape) for t in state["trainable"]]
    if shapes != saved_shapes:
        logger.warning(
            "Ignoring checkpoint %s: its tensors have shapes %s, this run's %s.",
            path,
            saved_shapes[:1],
            shapes[:1],
        )
        return 0
    with torch.no_grad():
        for tensor, saved in zip(student.trainable(), state["trainable"], strict=True):
            tensor.copy_(saved)
    optimizer.load_state_dict(state["optimizer"])
    logger.info("Resuming from %s at step %d", path, state["step"])
    return int(state["step"])
