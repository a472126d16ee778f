"""Lineage: every artifact records which versions of which inputs made it.

A lineage record is a JSON-able dict stored inside the artifact itself, so it travels with the
file: a cartridge keeps it in its safetensors header (``info.extra["lineage"]``), a table in its
parquet metadata (``DataFrame.attrs`` / ``ShardedTable.attrs``). It names the artifact's own
catalog dataset and version, the code that made it (package version, git commit, pipeline and
node) and, transitively, every upstream input with its version and content digest::

    {"dataset": "cartridge", "version": "2026-11-28T09.10.00.000Z", "git_commit": "1a2b...",
     "inputs": {"conversations": {"version": ..., "digest": ..., "run_id": ...},
                "teacher_logprobs": {...}, "chunk_set": {...}, "corpus": {...}}}

The Kedro hook that fills records in is ``cartridges.hooks.LineageHook``; this module is plain
library code. ``python -m cartridges.lineage PATH`` prints an artifact's record.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from cartridges import __version__

LINEAGE = "lineage"  # the key under which artifacts keep their record
RUN_ID = "run_id"  # the key under which self-study binds its conversations and targets


class LineageError(ValueError):
    """Inputs that do not belong together (e.g. conversations and targets of different runs)."""


# --------------------------------------------------------------------------- the code's identity
@functools.cache
def git_commit(root: str | None = None) -> str | None:
    """The checked-out commit (``+dirty`` when the tree has changes), or None outside git."""
    cwd = root or str(Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{commit}+dirty" if status else commit


def code_identity() -> dict[str, str | None]:
    """What made an artifact: the package version and the git commit when there is one."""
    return {"package_version": __version__, "git_commit": git_commit()}


# --------------------------------------------------------------------------- records on data
def _attrs(data: Any) -> dict | None:
    """The mutable metadata dict an artifact carries, or None for types that carry none."""
    from cartridges.cartridge import Cartridge
    from cartridges.tables import ShardedTable

    if isinstance(data, Cartridge):
        return data.info.extra
    if isinstance(data, pd.DataFrame | ShardedTable):
        return data.attrs
    return None


def get(data: Any) -> dict[str, Any] | None:
    """The lineage record ``data`` carries (None when it has none)."""
    attrs = _attrs(data)
    return attrs.get(LINEAGE) if attrs is not None else None


def catalog_version(data: Any) -> str:
    """The catalog version an artifact was read from (or, failing that, saved as); ``""``."""
    attrs = _attrs(data) or {}
    return attrs.get("catalog_version") or (attrs.get(LINEAGE) or {}).get("version") or ""


def attach(data: Any, record: Mapping[str, Any]) -> bool:
    """Store ``record`` in ``data``; False for types that cannot carry one."""
    attrs = _attrs(data)
    if attrs is None:
        return False
    attrs[LINEAGE] = dict(record)
    return True


def digest(data: Any) -> str | None:
    """A short content digest of an artifact (None for types without one)."""
    from cartridges.cartridge import Cartridge
    from cartridges.tables import ShardedTable

    if isinstance(data, ShardedTable):
        return data.fingerprint()[:16]  # parquet footers: never reads the rows
    if isinstance(data, pd.DataFrame):
        columns = {
            name: data[name].map(_hashable) if data[name].dtype == object else data[name]
            for name in data.columns
        }
        hashed = pd.util.hash_pandas_object(pd.DataFrame(columns), index=False)
        return hashlib.sha256(hashed.to_numpy().tobytes()).hexdigest()[:16]
    if isinstance(data, Cartridge):
        sha = hashlib.sha256()
        for tensor in (data.frozen_keys, data.frozen_values, data.keys, data.values):
            sha.update(tensor.detach().float().cpu().numpy().tobytes())
        return sha.hexdigest()[:16]
    return None


def _hashable(value: Any) -> Any:
    if isinstance(value, list | tuple | dict) or hasattr(value, "tolist"):
        return json.dumps(value.tolist() if hasattr(value, "tolist") else value, default=str)
    return value


def input_entry(version: str | None, data: Any) -> dict[str, Any]:
    """How a record names one input: its version, digest and self-study run id if any."""
    entry: dict[str, Any] = {"version": version, "digest": digest(data)}
    run_id = (_attrs(data) or {}).get(RUN_ID)
    if run_id is not None:
        entry[RUN_ID] = run_id
    return entry


def merge_inputs(loaded: Mapping[str, tuple[str | None, Any]]) -> dict[str, dict[str, Any]]:
    """The transitive inputs of an artifact made from ``{name: (version, data)}``.

    Each input's own upstream inputs come first; a direct input overrides an upstream entry of
    the same name (it is the version actually read).
    """
    merged: dict[str, dict[str, Any]] = {}
    for _name, (_version, data) in loaded.items():
        merged.update((get(data) or {}).get("inputs", {}))
    for name, (version, data) in loaded.items():
        if version is None and get(data) is not None:
            # An in-memory intermediate (e.g. the initial cartridge): it names no version of its
            # own, its inputs above stand for it.
            continue
        merged[name] = input_entry(version, data)
    return merged


# --------------------------------------------------------------------------- bound pairs
def check_pair(
    conversations: Any,
    teacher_logprobs: Any,
    versions: tuple[str | None, str | None] = (None, None),
    fix: str | None = None,
) -> None:
    """Refuse conversations and teacher targets written by different self-study runs.

    Conversation ids are deterministic, so an id check alone would pair one run's targets with
    another run's token ids. ``versions`` (of the two datasets) and ``fix`` (a suggested
    ``--load-versions``) make the message actionable.
    """
    ours = (_attrs(conversations) or {}).get(RUN_ID)
    theirs = (_attrs(teacher_logprobs) or {}).get(RUN_ID)
    if ours is None or theirs is None or ours == theirs:
        return
    first, second = versions
    message = (
        f"conversations (version {first or 'latest'}, self-study run {ours}) and "
        f"teacher_logprobs (version {second or 'latest'}, run {theirs}) come from different "
        "self-study runs: the targets would be paired with the wrong tokens."
    )
    if fix:
        message += f' Load a matching pair: --load-versions "{fix}"'
    raise LineageError(message)


def check_consistent(loaded: Mapping[str, tuple[str | None, Any]]) -> None:
    """Refuse a node's inputs when one was made from another version of another input.

    ``loaded`` is ``{name: (version, data)}`` of what a node reads. Where an input's record says
    it was made from ``name`` (directly or upstream) and the node also reads ``name`` itself,
    the two digests must agree: a chunk set of another corpus beside conversations of this one
    would train on one text and put another in context, silently.
    """
    found: dict[str, str | None] = {}
    for made, (made_version, data) in loaded.items():
        for item in data.values() if isinstance(data, dict) else [data]:
            for name, entry in ((get(item) or {}).get("inputs") or {}).items():
                recorded = entry.get("digest")
                if name not in loaded or name == made or recorded is None:
                    continue
                if name not in found:
                    found[name] = digest(loaded[name][1])
                if found[name] is not None and found[name] != recorded:
                    version = loaded[name][0] or "latest"
                    raise LineageError(
                        f"{made} (version {made_version or 'latest'}) was made from {name} "
                        f"version {entry.get('version')} (digest {recorded}), but this run reads "
                        f"{name} version {version} (digest {found[name]}): their contents differ, "
                        "so the run would pair artifacts of different inputs. Load the matching "
                        f'version: --load-versions "{name}:{entry.get("version")}", or rerun the '
                        f"pipelines after {name} to remake {made}."
                    )


# --------------------------------------------------------------------------- reading and printing
def read(path: str | Path) -> dict[str, Any]:
    """The lineage record of an artifact: a cartridge file or a (sharded) table, on a local
    disk or an object store (a URL)."""
    from cartridges.storage import open_store

    store, where = open_store(path)
    if store.is_file(where) and where.endswith((".safetensors", ".parquet")):
        with store.local_copy(where) as local:  # the file itself when local
            if where.endswith(".safetensors"):
                from cartridges.checkpoint import read_metadata

                info = json.loads(read_metadata(local).get("info", "{}"))
                return (info.get("extra") or {}).get(LINEAGE) or {}
            return pd.read_parquet(local).attrs.get(LINEAGE) or {}
    if store.is_dir(where):
        from cartridges.datasets.parquet_shards_dataset import read_attrs

        return read_attrs(where, store).get(LINEAGE) or {}
    raise FileNotFoundError(f"No cartridge file, parquet file or shard folder at '{path}'.")


def format_record(record: Mapping[str, Any]) -> str:
    """A human-readable, stable rendering of a lineage record."""
    if not record:
        return "(no lineage recorded)"
    lines = [f"{record.get('dataset', '?')} @ {record.get('version') or '(unversioned)'}"]
    for key in ("pipeline", "node", "package_version", "git_commit", "created"):
        if record.get(key) is not None:
            lines.append(f"  {key}: {record[key]}")
    for name, entry in sorted((record.get("inputs") or {}).items()):
        details = ", ".join(f"{k} {v}" for k, v in entry.items() if k != "version" and v)
        lines.append(f"  <- {name} @ {entry.get('version') or '(unversioned)'} ({details})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Print the lineage of a cartridge or table: what made it, from which inputs."
    )
    parser.add_argument("path", help="a cartridge .safetensors, a .parquet file or shard folder")
    parser.add_argument("--json", action="store_true", help="print the raw record as JSON")
    args = parser.parse_args(argv)
    record = read(args.path)
    print(json.dumps(record, indent=2) if args.json else format_record(record))  # noqa: T201


if __name__ == "__main__":
    main()
