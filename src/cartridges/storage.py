"""Where the project's data lives: a local path or any fsspec URL (``s3://``, ``gs://``, ...).

Every dataset of the project, and every folder the library writes (self-study's shards,
training checkpoints, evaluation results), goes through a :class:`Store`: the file system of one
URL, with the guarantees the project relies on kept on both kinds of storage.

- **A file appears whole or not at all.** Locally a temporary file is renamed into place
  (:mod:`cartridges.files`); on an object store a single PUT is atomic already, so the file is
  written locally and uploaded in one request.
- **A folder version appears whole or not at all.** Locally the folder is renamed into place. An
  object store has no rename: the files are uploaded first and the folder's manifest last, and a
  version counts as saved only once its manifest exists (the manifest is the commit).
- **Two writers never interleave.** Locally an advisory lock (``flock``) serialises them. An
  object store cannot lock, but it can refuse a write: :meth:`Store.put_if_absent` uses a
  conditional PUT (``If-None-Match: *``), so when two writers race for one name the first wins
  and the second is told, instead of silently replacing it.

Credentials and client options follow Kedro's convention (``credentials`` and ``fs_args`` of a
catalog entry); without them the client reads its usual environment (``AWS_ACCESS_KEY_ID``,
``AWS_ENDPOINT_URL``, ``~/.aws``...).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem
from kedro.io.core import get_protocol_and_path

from cartridges.files import atomic_folder, atomic_write, exclusive_lock

logger = logging.getLogger(__name__)

__all__ = [
    "MANIFEST",
    "Location",
    "Store",
    "StoreConflictError",
    "StoreLockError",
    "local_store",
    "open_store",
    "store_of",
]

MANIFEST = "_manifest.json"
"""The file that completes a folder version: written last, so its presence means the rest is
there (every folder dataset writes one; on an object store it is the commit)."""


LEASE_SECONDS = 60.0
"""How long a lock on an object store outlives a holder that stopped renewing it (killed)."""


class StoreConflictError(FileExistsError):
    """A write-if-absent found the name already taken (another writer got there first)."""


class StoreLockError(RuntimeError):
    """The store cannot take a lock (its client has no conditional writes)."""


@dataclass(frozen=True)
class Store:
    """The file system of one location. Paths given to its methods are without the protocol
    (``bucket/key``), as fsspec and Kedro's ``_filepath`` hold them; :meth:`url` adds it back."""

    fs: fsspec.AbstractFileSystem
    protocol: str = "file"
    _arrow: list[pafs.FileSystem] = field(default_factory=list, compare=False, repr=False)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def url(self, path: str | os.PathLike) -> str:
        """``path`` as a user writes it: with its protocol unless local."""
        return str(path) if self.is_local else f"{self.protocol}://{path}"

    def arrow(self) -> pafs.FileSystem:
        """The same location as a pyarrow file system: parquet reads fetch byte ranges."""
        if not self._arrow:
            self._arrow.append(
                pafs.LocalFileSystem() if self.is_local else pafs.PyFileSystem(_RangeReads(self.fs))
            )
        return self._arrow[0]

    def __getstate__(self) -> dict[str, Any]:
        return {"fs": self.fs, "protocol": self.protocol}

    def __setstate__(self, state: dict[str, Any]) -> None:
        object.__setattr__(self, "fs", state["fs"])
        object.__setattr__(self, "protocol", state["protocol"])
        object.__setattr__(self, "_arrow", [])

    # ------------------------------------------------------------------ queries
    def exists(self, path: str | os.PathLike) -> bool:
        return self.fs.exists(str(path))

    def is_file(self, path: str | os.PathLike) -> bool:
        return self.fs.isfile(str(path))

    def is_dir(self, path: str | os.PathLike) -> bool:
        return self.fs.isdir(str(path))

    def size(self, path: str | os.PathLike) -> int:
        return int(self.fs.size(str(path)))

    def children(self, path: str | os.PathLike) -> list[str]:
        """Names of the entries directly under ``path`` (none if it is not there)."""
        try:
            entries = self.fs.ls(str(path), detail=False)
        except FileNotFoundError:
            return []
        return sorted(PurePosixPath(entry).name for entry in entries)

    def is_complete_folder(self, path: str | os.PathLike) -> bool:
        """A folder version that is whole: its manifest exists (locally, a folder is whole as
        soon as it exists under its name, including versions written before manifests)."""
        if self.is_local:
            return Path(path).is_dir()
        return self.is_file(PurePosixPath(str(path)) / MANIFEST)

    def identity(self, path: str | os.PathLike) -> tuple[Any, ...]:
        """What changes whenever the file's content may have: locally inode, size and the
        modification and status-change times (the last cannot be set back, so a write hidden by
        ``utime`` shows); on an object store size and ETag (or modification time)."""
        if self.is_local:
            state = os.stat(path)
            return state.st_ino, state.st_size, state.st_mtime_ns, state.st_ctime_ns
        info = self.fs.info(str(path))
        tag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("mtime")
        return info.get("size"), str(tag or info.get("LastModified", ""))

    # ------------------------------------------------------------------ reading
    def open(self, path: str | os.PathLike, mode: str = "rb", **options: Any):
        if not self.is_local and "r" in mode:
            options.setdefault("cache_type", "none")  # ranged reads: see _RangeReads
        return self.fs.open(str(path), mode, **options)

    def read_bytes(self, path: str | os.PathLike) -> bytes:
        return self.fs.cat_file(str(path))

    def read_text(self, path: str | os.PathLike) -> str:
        return self.read_bytes(path).decode("utf-8")

    def read_json(self, path: str | os.PathLike) -> Any:
        return json.loads(self.read_text(path))

    @contextmanager
    def local_copy(self, path: str | os.PathLike) -> Iterator[Path]:
        """A local path holding the file or folder ``path`` for the block: the path itself when
        local, else a download into a temporary folder removed afterwards."""
        if self.is_local:
            yield Path(path)
            return
        with tempfile.TemporaryDirectory(prefix="cartridges-") as scratch:
            target = Path(scratch) / PurePosixPath(str(path)).name
            if self.is_dir(path):
                self.fs.get(str(path).rstrip("/") + "/", str(target), recursive=True)
            else:
                self.fs.get_file(str(path), str(target))
            yield target

    # ------------------------------------------------------------------ writing
    @contextmanager
    def write_file(self, path: str | os.PathLike) -> Iterator[Path]:
        """Yield a local temporary path; on success it becomes ``path`` whole (locally by
        rename, on an object store by one upload), on error nothing is left."""
        if self.is_local:
            with atomic_write(path) as temporary:
                yield temporary
            return
        with tempfile.TemporaryDirectory(prefix="cartridges-") as scratch:
            temporary = Path(scratch) / PurePosixPath(str(path)).name
            yield temporary
            self.fs.put_file(str(temporary), str(path))

    def write_bytes(self, path: str | os.PathLike, data: bytes) -> None:
        with self.write_file(path) as temporary:
            temporary.write_bytes(data)

    def put_if_absent(self, path: str | os.PathLike, data: bytes) -> None:
        """Write ``path`` only if nothing is there yet, atomically with the check.

        Raises:
            StoreConflictError: the name was taken, by another writer or before.
        """
        if self.is_local:
            target = Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            try:
                temporary.write_bytes(data)
                os.link(temporary, target)  # refused if the name exists: check and write at once
            except FileExistsError as error:
                raise StoreConflictError(f"'{target}' already exists.") from error
            finally:
                temporary.unlink(missing_ok=True)
            return
        try:
            self.fs.pipe_file(str(path), data, IfNoneMatch="*")
        except TypeError as error:  # a client without conditional writes
            raise StoreLockError(
                f"'{self.url(path)}': this store's client cannot write only-if-absent ({error}), "
                "so it cannot be locked; keep this folder on a local or shared file system."
            ) from error
        except OSError as error:
            if "pre-condition" in str(error).lower() or "precondition" in str(error).lower():
                raise StoreConflictError(f"'{self.url(path)}' already exists.") from error
            raise

    @contextmanager
    def write_folder(self, path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
        """Yield an empty local folder; on success it becomes the folder ``path`` whole.

        The writer puts a :data:`MANIFEST` in it, or one listing every file and its size is
        added. Locally the folder is renamed into place (``replace`` swaps out an old one). On an
        object store every other file is uploaded first and the manifest last, so a reader that
        waits for the manifest never sees part of a version; ``replace`` removes the old files
        first (an unversioned entry: a crash between the two leaves no manifest, so no version).
        """
        if self.is_local:
            with atomic_folder(path, replace=replace) as temporary:
                yield temporary
                _add_manifest(temporary)
            return
        with tempfile.TemporaryDirectory(prefix="cartridges-") as scratch:
            temporary = Path(scratch) / "folder"
            temporary.mkdir()
            yield temporary
            _add_manifest(temporary)
            target = str(path).rstrip("/")
            if self.exists(target):
                if not replace:
                    raise FileExistsError(f"'{self.url(target)}' already exists.")
                self.fs.rm(target, recursive=True)
            files = sorted(p for p in temporary.rglob("*") if p.is_file() and p.name != MANIFEST)
            for file in files:
                self.fs.put_file(str(file), f"{target}/{file.relative_to(temporary).as_posix()}")
            self.fs.put_file(str(temporary / MANIFEST), f"{target}/{MANIFEST}")

    @contextmanager
    def lock(
        self,
        path: str | os.PathLike,
        on_wait: Callable[[], None] | None = None,
        lease_seconds: float = LEASE_SECONDS,
    ) -> Iterator[None]:
        """Hold ``path`` as an exclusive lock for the block; a second holder waits its turn.

        Locally an advisory lock (``flock``), released by the operating system when its holder
        exits, even killed. An object store has no lock, so the lock is a *lease*: an object
        created only if absent (a conditional write, atomic on the server), naming its holder
        and renewed every quarter of ``lease_seconds`` by a thread; a lease not renewed for
        ``lease_seconds`` (its holder was killed) is taken over. It assumes the machines'
        clocks agree to well within ``lease_seconds``, and a store that refuses conditional
        writes is refused here, clearly, rather than locked by a check-then-write race.
        """
        if self.is_local:
            with exclusive_lock(path, on_wait=on_wait):
                yield
            return
        lease = _Lease(self, str(path), lease_seconds)
        lease.acquire(on_wait)
        try:
            yield
        finally:
            lease.release()

    def remove(self, path: str | os.PathLike) -> None:
        """Delete a file or a folder; the manifest first, so a half-removed version is none."""
        if self.is_local:
            target = Path(path)
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
            return
        manifest = f"{str(path).rstrip('/')}/{MANIFEST}"
        if self.is_file(manifest):
            self.fs.rm_file(manifest)
        if self.exists(path):
            self.fs.rm(str(path), recursive=True)


class _Lease:
    """An exclusive lease on an object store (see :meth:`Store.lock`)."""

    def __init__(self, store: Store, path: str, seconds: float) -> None:
        self.store, self.path, self.seconds = store, path, seconds
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps({"owner": self.owner, "renewed": time.time()}).encode()

    def acquire(self, on_wait: Callable[[], None] | None) -> None:
        waited = False
        while True:
            try:
                self.store.put_if_absent(self.path, self._record())
                break
            except StoreConflictError:
                holder = self._holder()
                if holder is not None and time.time() - holder["renewed"] > self.seconds:
                    logger.warning(
                        "Taking over the lease %s: its holder %s has not renewed it for %.0f s "
                        "(killed?).",
                        self.store.url(self.path),
                        holder.get("owner"),
                        time.time() - holder["renewed"],
                    )
                    if self._holder() == holder:  # still the stale one, not a new holder's
                        self.store.fs.rm_file(self.path)
                    continue
                if not waited and on_wait is not None:
                    on_wait()
                waited = True
                time.sleep(min(2.0, self.seconds / 4))
        self._renewer = threading.Thread(target=self._renew, daemon=True, name="lease")
        self._renewer.start()

    def _holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.store.read_text(self.path))
        except (FileNotFoundError, ValueError):
            return None

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 4):
            holder = self._holder()
            if holder is None or holder.get("owner") != self.owner:
                logger.error(
                    "Lost the lease %s to %s: another process may write the same folder.",
                    self.store.url(self.path),
                    (holder or {}).get("owner"),
                )
                return
            self.store.fs.pipe_file(self.path, self._record())

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        holder = self._holder()
        if holder is not None and holder.get("owner") == self.owner:
            self.store.fs.rm_file(self.path)


class _RangeReads(pafs.FSSpecHandler):
    """Files opened without read-ahead: parquet asks for the byte ranges it needs (a footer, the
    column chunks of a row group) and each is one ranged GET, not a block of the rest of the
    file."""

    def open_input_file(self, path: str):
        return pa.PythonFile(self.fs.open(path, mode="rb", cache_type="none"), mode="r")


@dataclass(frozen=True)
class Location:
    """A file or folder the library writes outside the catalog (self-study's ``shard_dir``,
    training's ``checkpoint_dir``, evaluation's ``results_dir``): a local path or a URL, whose
    client reads its credentials from the environment."""

    store: Store
    path: str

    @classmethod
    def of(cls, where: str | os.PathLike | Location) -> Location:
        if isinstance(where, Location):
            return where
        store, path = open_store(where)
        return cls(store, path)

    def __truediv__(self, name: str) -> Location:
        return Location(self.store, f"{self.path.rstrip('/')}/{name}")

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def parent(self) -> Location:
        return Location(self.store, str(PurePosixPath(self.path).parent))

    def __str__(self) -> str:
        return self.store.url(self.path)

    def __fspath__(self) -> str:
        """A local path, for the libraries that only open files (a store's path is a URL)."""
        return str(self)

    def exists(self) -> bool:
        return self.store.exists(self.path)

    def is_file(self) -> bool:
        return self.store.is_file(self.path)

    def children(self) -> list[str]:
        return self.store.children(self.path)

    def read_bytes(self) -> bytes:
        return self.store.read_bytes(self.path)

    def read_text(self) -> str:
        return self.store.read_text(self.path)

    def write_bytes(self, data: bytes) -> None:
        self.store.write_bytes(self.path, data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def write_file(self):
        """See :meth:`Store.write_file`."""
        return self.store.write_file(self.path)

    def local_copy(self):
        """See :meth:`Store.local_copy`."""
        return self.store.local_copy(self.path)

    def remove(self) -> None:
        self.store.remove(self.path)


def _add_manifest(folder: Path) -> None:
    if (folder / MANIFEST).exists():
        return
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    entries = [{"file": p.relative_to(folder).as_posix(), "bytes": p.stat().st_size} for p in files]
    (folder / MANIFEST).write_text(json.dumps({"files": entries}, indent=1))


_LOCAL: list[Store] = []


def local_store() -> Store:
    """The local file system (one shared instance)."""
    if not _LOCAL:
        _LOCAL.append(Store(LocalFileSystem(auto_mkdir=True)))
    return _LOCAL[0]


def open_store(
    filepath: str | os.PathLike,
    credentials: dict[str, Any] | None = None,
    fs_args: dict[str, Any] | None = None,
) -> tuple[Store, str]:
    """The store of ``filepath`` and the path within it (without its protocol).

    ``credentials`` and ``fs_args`` go to the fsspec file system, as in Kedro's own datasets
    (e.g. ``{"key": ..., "secret": ...}`` and ``{"client_kwargs": {"endpoint_url": ...}}`` for
    S3).
    """
    protocol, path = get_protocol_and_path(str(filepath))
    options = {**(fs_args or {}), **(credentials or {})}
    if protocol == "file":
        options.setdefault("auto_mkdir", True)
        path = os.path.expanduser(path)  # one meaning for reads (fsspec expands) and writes
    else:  # other machines write the same store: a cached listing would hide their versions
        options.setdefault("use_listings_cache", False)
    return Store(fsspec.filesystem(protocol, **options), protocol), path


def store_of(dataset: Any) -> Store:
    """The store a catalog dataset reads and writes (a local one if it does not say)."""
    store = getattr(dataset, "_store", None)
    if isinstance(store, Store):
        return store
    fs = getattr(dataset, "_fs", None)
    if isinstance(fs, fsspec.AbstractFileSystem):
        return Store(fs, getattr(dataset, "_protocol", "file") or "file")
    return local_store()
