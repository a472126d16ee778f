"""Atomic writes: a file or folder appears whole under its final name, or not at all.

Everything the project persists (shards, checkpoints, cartridges, versioned folders) goes through
here, so that a crash or a kill -9 mid-write never leaves a truncated artifact that a resumed
run would trust. The temporary sits next to its target (same filesystem, so the final
``os.replace`` is atomic) and is hidden with a leading dot, so folder listings skip it.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; a second writer is not held back
    fcntl = None

logger = logging.getLogger(__name__)


def _temporary_beside(target: Path) -> Path:
    return target.with_name(f".{target.name}.{os.getpid()}.tmp")


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path; on success it replaces ``path``, on error it is removed.

    The parent folder is created. Write to the yielded path with any writer (``torch.save``,
    ``pq.write_table``, ``save_file``...)::

        with atomic_write(target) as temporary:
            torch.save(state, temporary)
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_beside(target)
    try:
        yield temporary
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def make_read_only(path: str | os.PathLike) -> None:
    """Clear the write bits of a finished file, so that no writer changes it in place (files
    that versions share by hard link stay what was written)."""
    mode = os.stat(path).st_mode
    os.chmod(path, mode & ~0o222)


@contextmanager
def atomic_folder(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it becomes ``path``, on error it is removed.

    ``path`` must not exist yet (versioned outputs are never overwritten in place), unless
    ``replace``: then the old folder stays whole until the new one is complete, is moved aside,
    and is deleted once the new one is in place (two renames, so a crash between them leaves
    the old folder beside the target under a hidden name instead of a mix of the two).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_beside(target)
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    old = target.with_name(f".{target.name}.{os.getpid()}.old")
    try:
        yield temporary
        if replace and target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(temporary, target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def exclusive_lock(
    path: str | os.PathLike, on_wait: Callable[[], None] | None = None
) -> Iterator[None]:
    """Hold an exclusive advisory lock on the file ``path`` (created if missing) for the block.

    A process that finds it held calls ``on_wait`` and waits its turn. The operating system
    releases the lock when its holder exits, even killed, so a crash never leaves it stale.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "a") as handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait()
                fcntl.flock(handle, fcntl.LOCK_EX)
            except OSError as error:  # a file system without locks (some NFS mounts)
                logger.warning(
                    "Cannot lock %s (%s): not held back from other processes", target, error
                )
        yield
