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
  object store cannot lock, but it can refuse a write: a lock there is a lease object written
  only if absent (``If-None-Match: *``) and renewed, taken over or removed only if unchanged
  (``If-Match``), so of two writers racing for it the first wins and the second is told, and a
  holder that lost it finds out before its next write (:meth:`Store.lock`).

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
    "HeldLock",
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

_CONDITIONAL_PROTOCOLS = ("s3", "s3a")
_CONFLICT_RETRIES = 5


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
    _conditional_writes: list[bool] = field(default_factory=list, compare=False, repr=False)

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
        object.__setattr__(self, "_conditional_writes", [])

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

    def file_sizes(self, path: str | os.PathLike) -> dict[str, int]:
        """The files directly under ``path`` and their sizes in bytes, from one listing (one
        request on an object store, however many files)."""
        try:
            entries = self.fs.ls(str(path), detail=True)
        except FileNotFoundError:
            return {}
        return {
            PurePosixPath(entry["name"]).name: int(entry["size"])
            for entry in entries
            if entry["type"] == "file"
        }

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
        return _identity(self.fs.info(str(path)))

    @property
    def pins_reads(self) -> bool:
        """Whether a file opened here reads only the object it was opened on: the S3 client
        sends the ETag of its opening HEAD with every ranged GET (``If-Match``), so an object
        replaced meanwhile fails the read instead of mixing two versions."""
        return self.protocol in _CONDITIONAL_PROTOCOLS

    def open_pinned(self, path: str | os.PathLike, identity: tuple[Any, ...]):
        """Open the object ``path`` as it was at ``identity`` (size, ETag), with no request:
        every ranged GET carries ``If-Match: <ETag>`` (the S3 client's own expiry check, which
        it arms after its opening HEAD), so a replaced object fails the read."""
        size, etag = identity
        handle = self.fs.open(str(path), "rb", cache_type="none", size=size)
        handle.details = {"name": str(path), "size": size, "ETag": etag}
        handle.read_kw = {**handle.read_kw, "IfMatch": etag}
        return handle

    def identity_of(self, handle: Any) -> tuple[Any, ...]:
        """:meth:`identity` of a file opened on an object store, from its opening request."""
        return _identity(handle.details)

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

    def put_if_absent(self, path: str | os.PathLike, data: bytes) -> str | None:
        """Write ``path`` only if nothing is there yet, atomically with the check.

        Returns:
            The new object's ETag on an object store (``None`` locally).

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
            return None
        self._require_conditional_writes(path)
        response = self._conditionally(
            path,
            "already exists",
            lambda: self.fs.pipe_file(str(path), data, IfNoneMatch="*"),
            missing_is_conflict=False,
        )
        return response["ETag"]

    def replace_if_unchanged(self, path: str | os.PathLike, data: bytes, etag: str) -> str:
        """Overwrite the object ``path`` only if its ETag is still ``etag``; its new ETag.

        Raises:
            StoreConflictError: another writer changed (or removed) it since.
        """
        self._require_conditional_writes(path)
        response = self._conditionally(
            path,
            "changed since it was read",
            lambda: self.fs.pipe_file(str(path), data, IfMatch=etag),
        )
        return response["ETag"]

    def remove_if_unchanged(self, path: str | os.PathLike, etag: str) -> None:
        """Delete the object ``path`` only if its ETag is still ``etag``.

        Raises:
            StoreConflictError: another writer changed it since.
        """
        self._require_conditional_writes(path)
        bucket, key, _ = self.fs.split_path(str(path))
        self._conditionally(
            path,
            "changed since it was read",
            lambda: self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=etag),
        )

    def etag(self, path: str | os.PathLike) -> str:
        """The object's ETag (it changes with every write), fetched now."""
        return self.fs.info(str(path))["ETag"]

    def _require_conditional_writes(self, path: str | os.PathLike) -> None:
        if self.protocol not in _CONDITIONAL_PROTOCOLS:
            raise StoreLockError(
                f"'{self.url(path)}': writing only if absent or unchanged is implemented for S3 "
                "(conditional PUT and DELETE), not for this store, so it cannot be locked; keep "
                "this folder on S3, or on a local or shared file system."
            )

    def _conditionally(
        self,
        path: str | os.PathLike,
        refusal: str,
        request: Callable[[], Any],
        missing_is_conflict: bool = True,
    ):
        """``request``, a conditional write: a refused condition is a :class:`StoreConflictError`
        (so is a missing object, unless ``missing_is_conflict`` is false: then a missing bucket
        stays a ``FileNotFoundError``); a conflict with a concurrent conditional write (HTTP 409)
        is retried."""
        for attempt in range(_CONFLICT_RETRIES + 1):
            try:
                return request()
            except FileNotFoundError as error:
                if not missing_is_conflict:
                    raise
                raise StoreConflictError(f"'{self.url(path)}' {refusal}.") from error
            except FileExistsError as error:
                raise StoreConflictError(f"'{self.url(path)}' {refusal}.") from error
            except OSError as error:
                message = str(error).lower()
                if "pre-condition" in message or "precondition" in message:
                    raise StoreConflictError(f"'{self.url(path)}' {refusal}.") from error
                if "conflict" not in message or attempt == _CONFLICT_RETRIES:
                    raise
                time.sleep(0.05 * 2**attempt)
        raise AssertionError("unreachable")

    def check_conditional_writes(self, folder: str | os.PathLike) -> None:
        """Refuse, clearly, a store that ignores ``If-None-Match`` (it would accept both writers).

        Probed once per store: an object written twice only if absent must be refused the
        second time.
        """
        if self.is_local or self._conditional_writes:
            return
        probe = f"{str(folder).rstrip('/')}/.conditional-write-probe-{uuid.uuid4().hex}"
        self.put_if_absent(probe, b"probe")
        ignored = []
        try:
            for header, write in (
                ("If-None-Match", lambda: self.put_if_absent(probe, b"probe")),
                ("If-Match", lambda: self.replace_if_unchanged(probe, b"probe", '"0"')),
            ):
                try:
                    write()
                    ignored.append(header)
                except StoreConflictError:
                    pass
        finally:
            self.fs.rm_file(probe)
        if not ignored:
            self._conditional_writes.append(True)
            return
        raise StoreLockError(
            f"'{self.url(folder)}': this store accepted a write that {ignored[0]} should have "
            f"refused (it ignores {' and '.join(ignored)}), so it cannot be locked; keep this "
            "folder on a local or shared file system, or on a store with conditional writes."
        )

    @contextmanager
    def write_folder(
        self,
        path: str | os.PathLike,
        replace: bool = False,
        copies: list[tuple[str, str, str]] | None = None,
    ) -> Iterator[Path]:
        """Yield an empty local folder; on success it becomes the folder ``path`` whole.

        The writer puts a :data:`MANIFEST` in it, or one listing every file and its size is
        added. Locally the folder is renamed into place (``replace`` swaps out an old one). On an
        object store every other file is uploaded first and the manifest last, so a reader that
        waits for the manifest never sees part of a version; ``replace`` removes the old files
        first (an unversioned entry: a crash between the two leaves no manifest, so no version).

        ``copies``: ``(path in this store, name in the folder, its ETag)`` the writer adds during
        the block, for files already in this store: on an object store they are copied by the
        server (no byte passes through this machine, none is staged on its disk), each only if
        still at that ETag, before the manifest.
        """
        copies = copies if copies is not None else []
        if self.is_local:
            with atomic_folder(path, replace=replace) as temporary:
                yield temporary
                for source, name, _ in copies:
                    shutil.copyfile(source, temporary / name)
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
            for source, name, etag in copies:
                self._conditionally(
                    source,
                    "changed since it was read",
                    lambda s=source, n=name, e=etag: self.fs.copy(
                        s, f"{target}/{n}", CopySourceIfMatch=e
                    ),
                )
            self.fs.put_file(str(temporary / MANIFEST), f"{target}/{MANIFEST}")

    @contextmanager
    def lock(
        self,
        path: str | os.PathLike,
        on_wait: Callable[[], None] | None = None,
        lease_seconds: float | None = None,
    ) -> Iterator[HeldLock]:
        """Hold ``path`` as an exclusive lock for the block; a second holder waits its turn.

        Locally an advisory lock (``flock``), released by the operating system when its holder
        exits, even killed. An object store has no lock, so the lock is a *lease*: an object
        created only if absent (a conditional write, atomic on the server) and renewed every
        quarter of ``lease_seconds`` (default :data:`LEASE_SECONDS`) by a thread, each renewal
        conditional on the lease being unchanged since the last; a lease left unchanged for its
        holder's ``lease_seconds`` (the holder was killed) is taken over, conditionally too. A
        lease can be lost (a network cut longer than half its time, a takeover): the writer
        calls the yielded lock's :meth:`HeldLock.check` before each write it commits. A store
        that ignores conditional writes is refused here, clearly, rather than locked by a
        check-then-write race.
        """
        if self.is_local:
            with exclusive_lock(path, on_wait=on_wait):
                yield HeldLock()
            return
        lease = _Lease(self, str(path), lease_seconds or LEASE_SECONDS)
        lease.acquire(on_wait)
        try:
            yield lease
        finally:
            lease.release()

    def remove(self, path: str | os.PathLike) -> None:
        """Delete a file or a folder; on an object store every manifest in it first (however
        deep: ``<version>/<name>/_manifest.json``), so a half-removed version is none."""
        if self.is_local:
            target = Path(path)
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
            return
        for manifest in [f for f in self.fs.find(str(path)) if f.endswith(f"/{MANIFEST}")]:
            self.fs.rm_file(manifest)
        if self.exists(path):
            self.fs.rm(str(path), recursive=True)


def _lease_seconds(record: dict[str, Any] | None, default: float) -> float:
    """How long the holder of a lease said it may go without renewing it."""
    seconds = (record or {}).get("seconds")
    return float(seconds) if isinstance(seconds, int | float) and seconds > 0 else default


class HeldLock:
    """A lock held by this process (see :meth:`Store.lock`); a local one cannot be lost."""

    def check(self) -> None:
        """Raise :class:`StoreLockError` if the lock is no longer this process's."""


class _Lease(HeldLock):
    """An exclusive lease on an object store (see :meth:`Store.lock`).

    Every write of the lease object is conditional on the ETag its writer last saw, so exactly
    one process holds it: a renewal fails once another process took it over, and of two
    processes taking over one stale lease only the first succeeds. Staleness is judged on the
    waiter's own clock (the ETag unchanged for the holder's lease time), so the machines' clocks
    need not agree.
    """

    def __init__(self, store: Store, path: str, seconds: float) -> None:
        self.store, self.path, self.seconds = store, path, seconds
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.etag = ""
        self._writes = 0
        self.renewed = time.monotonic()
        self._lost: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _record(self) -> bytes:
        # A new body each time: an ETag is a digest of the body, and a renewal must change it.
        self._writes += 1
        record = {"owner": self.owner, "seconds": self.seconds, "renewal": self._writes}
        return json.dumps(record).encode()

    def acquire(self, on_wait: Callable[[], None] | None) -> None:
        self.store.check_conditional_writes(PurePosixPath(self.path).parent)
        seen, since, holder, waited = None, 0.0, None, False
        while True:
            try:
                self.etag = self.store.put_if_absent(self.path, self._record())
                break
            except StoreConflictError:
                ours = self._ours()
                if ours is not None:  # our own creation, answered after a retry
                    self.etag = ours
                    break
            try:
                etag = self.store.etag(self.path)
            except FileNotFoundError:
                continue  # released meanwhile: try again at once
            if etag != seen:  # a new holder, or a renewal: it is alive
                seen, since, holder = etag, time.monotonic(), self._holder()
            patience = _lease_seconds(holder, self.seconds)
            if etag == seen and time.monotonic() - since > patience:
                try:
                    self.etag = self.store.replace_if_unchanged(self.path, self._record(), etag)
                except StoreConflictError:
                    continue  # renewed, or taken over by another waiter, meanwhile
                logger.warning(
                    "Took over the lease %s: its holder %s had not renewed it for %.0f s "
                    "(killed?).",
                    self.store.url(self.path),
                    (holder or {}).get("owner", "(unknown)"),
                    time.monotonic() - since,
                )
                break
            if not waited and on_wait is not None:
                on_wait()
            waited = True
            time.sleep(min(2.0, patience / 4))
        self.renewed = time.monotonic()
        self._renewer = threading.Thread(target=self._renew, daemon=True, name="lease")
        self._renewer.start()

    def _holder(self) -> dict[str, Any] | None:
        try:
            record = json.loads(self.store.read_text(self.path))
        except (FileNotFoundError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def _ours(self) -> str | None:
        """The lease's ETag if what it holds is this holder's last write (a request retried
        after its response was lost finds its own write there), else ``None``."""
        try:
            with self.store.open(self.path) as handle:  # the body read is pinned to this ETag
                etag, body = handle.details["ETag"], handle.read()
            record = json.loads(body)
        except (OSError, ValueError):
            return None
        mine = isinstance(record, dict) and record.get("owner") == self.owner
        return etag if mine and record.get("renewal") == self._writes else None

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 4):
            try:
                self.etag = self.store.replace_if_unchanged(self.path, self._record(), self.etag)
                self.renewed = time.monotonic()
            except StoreConflictError:
                ours = self._ours()
                if ours is not None:  # our own renewal, answered after a retry
                    self.etag, self.renewed = ours, time.monotonic()
                    continue
                self._lose("another process took it over")
                return
            except Exception as error:  # the network: try again at the next tick, in time
                late = time.monotonic() - self.renewed
                if late > self.seconds / 2:
                    self._lose(f"not renewed for {late:.0f} s ({error})")
                    return
                logger.warning("Could not renew the lease %s (%s); retrying.", self.path, error)

    def _lose(self, why: str) -> None:
        self._lost = why
        logger.error("Lost the lease %s: %s.", self.store.url(self.path), why)

    def check(self) -> None:
        late = time.monotonic() - self.renewed
        if self._lost is None and late > self.seconds / 2:
            self._lost = f"not renewed for {late:.0f} s"
        if self._lost is not None:
            raise StoreLockError(
                f"Lost the lease {self.store.url(self.path)} ({self._lost}): stopping so as not "
                "to write beside another process. What was written is kept; rerun to resume."
            )

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if not self.etag:
            return
        try:  # conditional: removes the lease only if no one took it over
            self.store.remove_if_unchanged(self.path, self.etag)
        except StoreConflictError:
            if self._lost is None:
                logger.warning("The lease %s was taken over before its release.", self.path)
        except Exception as error:  # noqa: BLE001 - never hide the error of the block it guarded
            logger.warning(
                "Could not release the lease %s (%s): it expires in %.0f s.",
                self.store.url(self.path),
                error,
                self.seconds,
            )


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


def _identity(info: dict[str, Any]) -> tuple[Any, ...]:
    tag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("mtime")
    return info.get("size"), str(tag or info.get("LastModified", ""))


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
    options = _merged(fs_args or {}, credentials or {})
    if protocol == "file":
        options.setdefault("auto_mkdir", True)
        path = os.path.expanduser(path)  # one meaning for reads (fsspec expands) and writes
    else:  # other machines write the same store: a cached listing would hide their versions
        options.setdefault("use_listings_cache", False)
    return Store(fsspec.filesystem(protocol, **options), protocol), path


def _merged(options: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """``options`` updated by ``more``, nested dictionaries merged key by key: credentials
    holding ``client_kwargs`` (a region) keep the endpoint that ``fs_args`` put there."""
    merged = dict(options)
    for key, value in more.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


def store_of(dataset: Any) -> Store:
    """The store a catalog dataset reads and writes (a local one if it does not say)."""
    store = getattr(dataset, "_store", None)
    if isinstance(store, Store):
        return store
    fs = getattr(dataset, "_fs", None)
    if isinstance(fs, fsspec.AbstractFileSystem):
        return Store(fs, getattr(dataset, "_protocol", "file") or "file")
    return local_store()
