"""Kedro hooks: lineage in every artifact, only rank 0 writing under a distributed launcher, and
a node's outputs visible together or not at all.

``torchrun --nproc-per-node N -m kedro run --pipelines distill_training`` starts N Kedro sessions.
All of them must train (each holds a shard of every global batch), but only rank 0 may save the
catalog's outputs. On the other ranks this hook wraps every persisted dataset so that its saves
stay in memory for the rest of the run while its loads still read the inputs from disk.
"""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import mlflow
from kedro.framework.hooks import hook_impl
from kedro.io import AbstractDataset, AbstractVersionedDataset, DataCatalog, MemoryDataset
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource

from cartridges import lineage
from cartridges.storage import store_of

logger = logging.getLogger(__name__)


def process_rank() -> int:
    """The global rank set by torchrun (0 when not launched distributed)."""
    return int(os.environ.get("RANK", "0"))


class _RankLocalDataset(AbstractDataset):
    """Reads the wrapped dataset until something is saved, then serves that from memory."""

    def __init__(self, inner: AbstractDataset) -> None:
        self._inner = inner
        self._memory: MemoryDataset | None = None

    def load(self) -> Any:
        return self._memory.load() if self._memory is not None else self._inner.load()

    def save(self, data: Any) -> None:
        self._memory = MemoryDataset(data, copy_mode="assign")

    def _exists(self) -> bool:
        return self._memory is not None or self._inner.exists()

    def _describe(self) -> dict[str, Any]:
        return {"rank_local": True, "inner": str(self._inner)}


class RankZeroOutputsHook:
    """Makes every rank but 0 keep its outputs in memory."""

    @hook_impl
    def after_catalog_created(self, catalog: DataCatalog) -> None:
        rank = process_rank()
        if rank == 0:
            return
        for name in list(catalog.keys()):
            if name.startswith("params:") or name == "parameters":
                continue
            dataset = catalog.get(name)
            if dataset is not None and not isinstance(dataset, MemoryDataset):
                catalog[name] = _RankLocalDataset(dataset)
        logger.info("Rank %d: outputs stay in memory; rank 0 writes them.", rank)


class OutputsTogetherHook:
    """A node's versioned outputs become visible together: when one of its saves fails, the
    versions its other outputs already saved in this run are removed, so that no partial set
    (``conversations`` without its ``teacher_logprobs``) is ever the latest.

    Kedro saves a node's outputs one after the other once the node has returned; this hook
    notes each save and, on the run's error, rolls back those of the node it stopped in. (A
    process killed between two saves cannot roll back: then the run id that both self-study
    tables carry makes every consumer refuse the unmatched pair, naming the versions.)
    """

    def __init__(self) -> None:
        self._catalog: DataCatalog | None = None
        self._node: str | None = None
        self._unsaved: set[str] = set()
        self._saved: list[str] = []

    @hook_impl
    def after_catalog_created(self, catalog: DataCatalog) -> None:
        self._catalog = catalog

    @hook_impl
    def after_node_run(self, node) -> None:
        self._node, self._unsaved, self._saved = node.name, set(node.outputs), []

    @hook_impl
    def after_dataset_saved(self, dataset_name: str) -> None:
        self._unsaved.discard(dataset_name)
        self._saved.append(dataset_name)
        if not self._unsaved:
            self._node, self._saved = None, []

    @hook_impl
    def on_pipeline_error(self, error: Exception) -> None:
        if self._node is None or self._catalog is None:
            return
        for name in self._saved:
            removed = _remove_saved_version(self._catalog, name)
            if removed is not None:
                logger.warning(
                    "Removed %s version %s (saved by %s): the node's other outputs %s were not "
                    "saved (%s), and a partial set must not become the latest.",
                    name,
                    removed.name,
                    self._node,
                    sorted(self._unsaved),
                    error,
                )
        self._node, self._saved = None, []


def _remove_saved_version(catalog: DataCatalog, name: str) -> PurePosixPath | None:
    """Delete the version folder this run saved for ``name``; its path, or ``None``."""
    dataset = catalog.get(name) if name in catalog else None
    while dataset is not None and not isinstance(dataset, AbstractVersionedDataset):
        dataset = getattr(dataset, "_inner", None)  # the MLflow and rank-local wrappers
    if dataset is None or dataset._version is None:
        return None
    saved = dataset._get_versioned_path(dataset.resolve_save_version())
    folder = PurePosixPath(str(saved)).parent  # <filepath>/<version>
    store = store_of(dataset)
    if not store.exists(folder):
        return None
    store.remove(folder)
    return folder


class LineageHook:
    """Writes a lineage record into every artifact a run saves, and refuses unbound pairs.

    It remembers the version (and digest) of every dataset a node loads, and before the node's
    outputs are saved, attaches to each output that can carry one a record naming them,
    transitively (``cartridges.lineage``). The same facts tag the run's MLflow run (git commit,
    package version, pipeline, model name and fingerprint, every input's version), and the
    corpus and conversations become its MLflow dataset inputs.

    Before a pipeline runs, conversations and teacher targets that it reads from the catalog
    (rather than makes) must come from one self-study run: otherwise the run stops before any
    model loads, naming both versions. Before a node runs, an input made from another version
    of an input the node also reads (a chunk set of another corpus) is refused the same way.
    """

    def __init__(self) -> None:
        self._catalog: DataCatalog | None = None
        self._pipeline: str | None = None
        self._loaded: dict[str, dict[str, tuple[str | None, Any]]] = {}
        self._logged_inputs: set[str] = set()

    @hook_impl
    def after_catalog_created(self, catalog: DataCatalog) -> None:
        self._catalog = catalog

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        self._pipeline = run_params.get("pipeline_name") or "__default__"
        self._loaded.clear()
        self._logged_inputs.clear()
        if {"conversations", "teacher_logprobs"} <= pipeline.inputs():
            _check_bound_pair(catalog)

    @hook_impl
    def after_dataset_loaded(self, dataset_name: str, data: Any, node) -> None:
        if dataset_name == "params:model" and isinstance(data, dict):
            _tag({"model.name": str(data.get("name_or_path"))})
        if dataset_name.startswith("params:") or dataset_name == "parameters":
            return
        version = _version(self._catalog, dataset_name, load=True)
        self._loaded.setdefault(node.name, {})[dataset_name] = (version, data)
        for item in _items(data):
            attrs = lineage._attrs(item)
            if attrs is not None and version is not None:
                attrs["catalog_version"] = version  # what this run read, for reports
        self._track_input(dataset_name, version, data)

    @hook_impl
    def before_node_run(self, node) -> None:
        lineage.check_consistent(self._loaded.get(node.name, {}))

    @hook_impl
    def before_dataset_saved(self, dataset_name: str, data: Any, node) -> None:
        record = {
            "dataset": dataset_name,
            "version": _version(self._catalog, dataset_name, load=False),
            "pipeline": self._pipeline,
            "node": node.name,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            **lineage.code_identity(),
            "inputs": lineage.merge_inputs(self._loaded.get(node.name, {})),
        }
        for item in _items(data):
            lineage.attach(item, record)
            fingerprint = getattr(getattr(item, "info", None), "model_fingerprint", None)
            if fingerprint:
                _tag({"model.fingerprint": fingerprint})

    def _track_input(self, name: str, version: str | None, data: Any) -> None:
        """Tag the run with an input's version; log corpus and conversations as MLflow inputs."""
        if mlflow.active_run() is None:
            return
        _tag(
            {
                "pipeline": self._pipeline or "",
                **{k: v or "" for k, v in lineage.code_identity().items()},
                f"input.{name}.version": version or "",
            }
        )
        if name not in TRACKED_INPUTS or name in self._logged_inputs:
            return
        self._logged_inputs.add(name)
        path = _path(self._catalog, name, version)
        source = LocalArtifactDatasetSource(path or name)
        dataset = MetaDataset(
            source, name=f"{name}@{version or 'unversioned'}", digest=lineage.digest(data)
        )
        mlflow.log_input(dataset, context=self._pipeline)


TRACKED_INPUTS = ("corpus", "conversations")  # logged as MLflow dataset inputs of the run


def _tag(tags: dict[str, str]) -> None:
    """Set tags on the active MLflow run (kedro-mlflow opens one per ``kedro run``)."""
    if mlflow.active_run() is not None:
        mlflow.set_tags({k: v[:5000] for k, v in tags.items()})


def _path(catalog: DataCatalog | None, name: str, version: str | None) -> str | None:
    """Where a catalog entry keeps the version that was read, as a URL or an absolute path
    (None if it cannot say)."""
    if catalog is None or name not in catalog:
        return None
    dataset = catalog.get(name)
    dataset = getattr(dataset, "wrapped", dataset)
    filepath = getattr(dataset, "_filepath", None)
    if filepath is None:
        return None
    path = PurePosixPath(str(filepath))
    path = path / version / path.name if version else path
    store = store_of(dataset)
    return str(Path(path).resolve()) if store.is_local else store.url(path)


def _items(data: Any) -> list[Any]:
    """The artifacts inside an output: a dict of cartridges (a sweep) holds several."""
    return list(data.values()) if isinstance(data, dict) else [data]


def _version(catalog: DataCatalog | None, name: str, load: bool) -> str | None:
    """The version a versioned dataset reads (or writes) in this run; None if unversioned."""
    if catalog is None or name not in catalog:
        return None
    dataset = catalog.get(name)
    if not hasattr(dataset, "resolve_load_version"):  # versioned, or a wrapper of one
        return None
    try:
        return dataset.resolve_load_version() if load else dataset.resolve_save_version()
    except Exception:  # noqa: BLE001 - nothing saved yet, or an unusual version setup
        return None


def _check_bound_pair(catalog) -> None:
    """Refuse conversations and teacher_logprobs of different self-study runs, naming a fix."""
    conversations, targets = catalog.load("conversations"), catalog.load("teacher_logprobs")
    versions = (
        _version(catalog, "conversations", True),
        _version(catalog, "teacher_logprobs", True),
    )
    try:
        lineage.check_pair(conversations, targets, versions)
    except lineage.LineageError:
        wanted = (lineage._attrs(conversations) or {}).get(lineage.RUN_ID)
        dataset = catalog.get("teacher_logprobs")
        match = next((v for v in _versions(dataset) if _run_id_of(dataset, v) == wanted), None)
        fix = f"conversations:{versions[0]},teacher_logprobs:{match}" if match else None
        lineage.check_pair(conversations, targets, versions, fix)


def _versions(dataset) -> list[str]:
    """A versioned folder dataset's versions, newest first."""
    root = PurePosixPath(str(getattr(dataset, "_filepath", "")))
    store = store_of(dataset)
    return sorted(
        (name for name in store.children(root) if store.is_dir(root / name)), reverse=True
    )


def _run_id_of(dataset, version: str) -> str | None:
    """The self-study run id stored with one version of a shard folder dataset."""
    from cartridges.datasets.parquet_shards_dataset import read_attrs

    root = PurePosixPath(str(getattr(dataset, "_filepath", "")))
    return read_attrs(root / version / root.name, store_of(dataset)).get(lineage.RUN_ID)
