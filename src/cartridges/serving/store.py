"""Resolve cartridge ids to files, safely, and keep loaded cartridges in an LRU cache.

An id is either a catalog dataset name (``cartridge`` is its latest version,
``cartridge@2026-11-24T21.07.56.078Z`` a given one) or a relative path inside the cartridge
directory (``manual`` or ``team/manual.safetensors``). Ids come from the network, so they are
checked twice: by a strict pattern (no absolute paths, no ``..``, no hidden components) and by
resolving symlinks and requiring the real path to stay inside its root.

:meth:`CartridgeStore.available` lists the ids that resolve to cartridge files made for the
served model, for ``/v1/models``; it reads file headers only, never the tensors.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel

from cartridges.cartridge import Cartridge, CartridgeMismatchError, compose
from cartridges.checkpoint import CartridgeFormatError, load_cartridge, read_metadata
from cartridges.modeling import model_fingerprint
from cartridges.serving.sets import SEPARATOR, CartridgeSet

logger = logging.getLogger(__name__)

SUFFIX = ".safetensors"
_COMPONENT = r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}"
_PATH_ID = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT}){{0,7}}")
_VERSION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,63}")

CacheKey = tuple[str, int, int]  # (real path, mtime_ns, size): a rewritten file is reloaded


class CartridgeLookupError(Exception):
    """A cartridge reference the server refuses; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_cartridge") -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.position: int | None = None
        """Index in the requested ids of the cartridge at fault (``None``: their composition)."""


@dataclass(frozen=True)
class Available:
    """A cartridge a request can name: its id and its file's modification time (seconds)."""

    id: str
    created: int


class CartridgeStore:
    """Cartridges by id, loaded once, checked against the served model, composed on demand.

    Not thread-safe by design beyond its own cache lock: the server calls :meth:`get` from its
    single model thread, because the compatibility check runs a forward pass of the model.

    Args:
        model: the served model; every cartridge is checked against it.
        cartridge_dir: root for path ids (it need not exist; then only catalog ids work).
        catalog_datasets: catalog dataset name -> versioned filepath.
        cache_size: how many loaded or composed cartridges to keep.
        sets: named sets of document cartridges; their members' ids are ``<set>:<document>``.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        cartridge_dir: str | Path,
        catalog_datasets: Mapping[str, str | Path] | None = None,
        cache_size: int = 8,
        sets: Mapping[str, CartridgeSet] | None = None,
    ) -> None:
        self.model = model
        self.sets = dict(sets or {})
        self.root = Path(cartridge_dir).resolve()
        self.catalog = {name: Path(path) for name, path in (catalog_datasets or {}).items()}
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[CacheKey, ...], Cartridge] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0  # files read from disk, for tests and /health

    # ------------------------------------------------------------------ resolution
    def resolve(self, cartridge_id: str) -> Path:
        """The real path of the file an id names, or :class:`CartridgeLookupError`."""
        if SEPARATOR in cartridge_id:
            return self._resolve_member(cartridge_id)
        name, _, version = cartridge_id.partition("@")
        if name in self.catalog:
            return self._resolve_catalog(cartridge_id, self.catalog[name], version or None)
        if "@" in cartridge_id or not _PATH_ID.fullmatch(cartridge_id):
            raise CartridgeLookupError(
                f"Invalid cartridge id {cartridge_id!r}: use a catalog name "
                f"({', '.join(sorted(self.catalog)) or 'none configured'}, optionally "
                "'@<version>') or a relative path inside the cartridge directory (letters, "
                "digits, '_', '-', '.', '/'; no absolute paths, no '..', no hidden names).",
                code="invalid_cartridge_id",
            )
        candidates = [self.root / cartridge_id]
        if not cartridge_id.endswith(SUFFIX):
            candidates.append(self.root / f"{cartridge_id}{SUFFIX}")
        for candidate in candidates:
            if candidate.is_symlink() or candidate.exists():
                return self._inside(candidate, self.root, cartridge_id)
        raise CartridgeLookupError(
            f"Cartridge {cartridge_id!r} not found in the cartridge directory.",
            status=404,
            code="cartridge_not_found",
        )

    def _resolve_member(self, cartridge_id: str) -> Path:
        set_name, _, document = cartridge_id.partition(SEPARATOR)
        if set_name not in self.sets:
            raise CartridgeLookupError(
                f"Cartridge {cartridge_id!r}: no cartridge set {set_name!r} (this server has "
                f"{sorted(self.sets) or 'none'}).",
                status=404,
                code="cartridge_not_found",
            )
        path = self.sets[set_name].files.get(document)
        if path is None:
            raise CartridgeLookupError(
                f"Cartridge {cartridge_id!r}: set {set_name!r} has no document {document!r} "
                f"({sorted(self.sets[set_name].files)}).",
                status=404,
                code="cartridge_not_found",
            )
        return path.resolve()

    def _resolve_catalog(self, cartridge_id: str, filepath: Path, version: str | None) -> Path:
        root = filepath.resolve()
        if version is None:
            versions = (
                sorted(
                    (d.name for d in root.iterdir() if (d / filepath.name).is_file()),
                    reverse=True,
                )
                if root.is_dir()
                else []
            )
            if not versions:
                raise CartridgeLookupError(
                    f"Catalog dataset {cartridge_id!r} has no saved version under {filepath}.",
                    status=404,
                    code="cartridge_not_found",
                )
            version = versions[0]
        elif not _VERSION.fullmatch(version):
            raise CartridgeLookupError(
                f"Invalid version {version!r} in cartridge id {cartridge_id!r}.",
                code="invalid_cartridge_id",
            )
        candidate = root / version / filepath.name
        if not (candidate.is_symlink() or candidate.exists()):
            raise CartridgeLookupError(
                f"Cartridge {cartridge_id!r}: no version {version!r} of the catalog dataset.",
                status=404,
                code="cartridge_not_found",
            )
        return self._inside(candidate, root, cartridge_id)

    @staticmethod
    def _inside(candidate: Path, root: Path, cartridge_id: str) -> Path:
        """Follow symlinks and refuse anything whose real path leaves ``root``."""
        real = candidate.resolve()
        if not real.is_relative_to(root):
            logger.warning("Refused cartridge id %r: it resolves outside %s", cartridge_id, root)
            raise CartridgeLookupError(
                f"Cartridge {cartridge_id!r} resolves outside the cartridge directory; refused.",
                status=403,
                code="cartridge_forbidden",
            )
        if not real.is_file():
            raise CartridgeLookupError(
                f"Cartridge {cartridge_id!r} not found.", status=404, code="cartridge_not_found"
            )
        return real

    # ------------------------------------------------------------------ listing
    def available(self) -> list[Available]:
        """The ids that name a cartridge file made for the served model, each file once per id.

        Catalog datasets first (the name, for the latest version, then ``name@<version>``,
        newest first), then the members of the cartridge sets (``<set>:<document>``), then the
        files of the cartridge directory by path (without the
        ``.safetensors`` suffix). Ids the store would refuse (hidden or odd names, symlinks out
        of their root) are left out, as are files that are not cartridges or were made for
        another model, and files shadowed by a catalog name.
        """
        fingerprint = model_fingerprint(self.model)
        found = []
        members = [s.member_id(d) for s in self.sets.values() for d in s.files]
        for cartridge_id in [*self._catalog_ids(), *members, *self._directory_ids()]:
            try:
                path = self.resolve(cartridge_id)
            except CartridgeLookupError:
                continue
            if self._made_for(path, fingerprint):
                found.append(Available(cartridge_id, int(path.stat().st_mtime)))
        return found

    def _catalog_ids(self) -> Iterator[str]:
        for name, filepath in self.catalog.items():
            root = filepath.resolve()
            if not root.is_dir():
                continue
            versions = sorted(
                (d.name for d in root.iterdir() if (d / filepath.name).is_file()), reverse=True
            )
            if versions:
                yield name
            yield from (f"{name}@{version}" for version in versions)

    def _directory_ids(self) -> Iterator[str]:
        if not self.root.is_dir():
            return
        for folder, subfolders, files in os.walk(self.root):  # symlinked folders not followed
            subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
            relative = Path(folder).relative_to(self.root)
            for name in sorted(f for f in files if f.endswith(SUFFIX)):
                cartridge_id = (relative / name).as_posix().removesuffix(SUFFIX)
                inside = (Path(folder) / name).resolve().is_relative_to(self.root)
                if inside and cartridge_id not in self.catalog:  # links out: skipped, unlogged
                    yield cartridge_id

    @staticmethod
    def _made_for(path: Path, fingerprint: str) -> bool:
        """Whether the file's header says it is a cartridge for the model of ``fingerprint``."""
        try:
            info = json.loads(read_metadata(path).get("info", "{}"))
        except (CartridgeFormatError, ValueError):
            return False
        return isinstance(info, dict) and info.get("model_fingerprint") in (None, "", fingerprint)

    # ------------------------------------------------------------------ loading
    def get(self, cartridge_ids: Sequence[str]) -> tuple[tuple[CacheKey, ...], Cartridge]:
        """The cartridges ``cartridge_ids`` name, composed in order, with the set's cache key."""
        keys, parts = [], []
        for position, cartridge_id in enumerate(cartridge_ids):
            try:
                path = self.resolve(cartridge_id)
                stat = path.stat()
                key = (str(path), stat.st_mtime_ns, stat.st_size)
                parts.append(self._cached((key,), lambda key=key: self._load(key[0])))
            except CartridgeLookupError as error:
                error.position = position
                raise
            keys.append(key)
        if len(parts) == 1:
            return tuple(keys), parts[0]
        return tuple(keys), self._cached(tuple(keys), lambda: self._compose(parts))

    def _cached(self, key: tuple[CacheKey, ...], build) -> Cartridge:
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        cartridge = build()
        with self._lock:
            self._cache[key] = cartridge
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return cartridge

    def _load(self, path: str) -> Cartridge:
        self.loads += 1
        try:
            cartridge = load_cartridge(path, device=self.model.device)
            cartridge.check_compatible(self.model)
        except CartridgeMismatchError as error:
            raise CartridgeLookupError(str(error), code="cartridge_model_mismatch") from error
        except (CartridgeFormatError, KeyError, OSError, RuntimeError, ValueError) as error:
            raise CartridgeLookupError(
                f"Not a readable cartridge file: {Path(path).name}.", code="cartridge_format_error"
            ) from error
        cartridge.requires_grad_(False)
        return cartridge.to(self.model.dtype)

    @staticmethod
    def _compose(parts: list[Cartridge]) -> Cartridge:
        try:
            return compose(parts).requires_grad_(False)
        except CartridgeMismatchError as error:
            raise CartridgeLookupError(str(error), code="cartridge_model_mismatch") from error

    def __len__(self) -> int:
        return len(self._cache)
