"""A catalog wrapper that logs what a dataset saves as an MLflow artifact of the active run.

kedro-mlflow's ``MlflowArtifactDataset`` cannot wrap a versioned dataset under Kedro 1.7 (the
inner dataset picks a save version of its own, which the catalog refuses, and ``--load-versions``
cannot reach it). This wrapper takes the catalog's version and hands it to the wrapped dataset,
so a versioned entry keeps its versions, its ``--load-versions`` and the run's single timestamp,
and whatever it writes is also logged to MLflow.
"""

from __future__ import annotations

import logging
from pathlib import PurePosixPath
from typing import Any

import mlflow
from kedro.io import AbstractDataset, Version

from cartridges.storage import store_of

logger = logging.getLogger(__name__)


class MlflowArtifactDataset(AbstractDataset[Any, Any]):
    """Saves through ``dataset`` and logs the written file or folder under ``artifact_path``.

    Example catalog entry (``versioned`` goes on the wrapper)::

        evaluation_report:
          type: cartridges.datasets.MlflowArtifactDataset
          artifact_path: reports
          versioned: true
          dataset:
            type: pandas.CSVDataset
            filepath: data/08_reporting/evaluation_report.csv
    """

    def __init__(
        self,
        dataset: dict[str, Any],
        artifact_path: str | None = None,
        version: Version | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        config = dict(dataset)
        if version is not None:
            config["versioned"] = True
        self._inner = AbstractDataset.from_config(
            "wrapped",
            config,
            load_version=version.load if version else None,
            save_version=version.save if version else None,
        )
        self._artifact_path = artifact_path
        self.metadata = metadata

    @property
    def wrapped(self) -> AbstractDataset:
        return self._inner

    def resolve_load_version(self) -> str | None:
        return getattr(self._inner, "resolve_load_version", lambda: None)()

    def resolve_save_version(self) -> str | None:
        return getattr(self._inner, "resolve_save_version", lambda: None)()

    def load(self) -> Any:
        return self._inner.load()

    def save(self, data: Any) -> None:
        self._inner.save(data)
        if mlflow.active_run() is None:
            return
        path, store = self._written_path(), store_of(self._inner)
        if path is None or not store.exists(path):
            logger.warning("Nothing to log to MLflow for %s: no file at %s.", self._inner, path)
            return
        with store.local_copy(path) as local:  # a download when the store is remote
            if local.is_dir():
                mlflow.log_artifacts(str(local), self._artifact_path)
            else:
                mlflow.log_artifact(str(local), self._artifact_path)

    def _written_path(self) -> PurePosixPath | None:
        inner = self._inner
        if hasattr(inner, "_get_save_path") and getattr(inner, "_version", None) is not None:
            # The version just written: _get_save_path would refuse to name it twice.
            return PurePosixPath(str(inner._get_versioned_path(inner.resolve_save_version())))
        for attribute in ("_filepath", "_path"):
            if hasattr(inner, attribute):
                return PurePosixPath(str(getattr(inner, attribute)))
        return None

    def _exists(self) -> bool:
        return self._inner.exists()

    def _describe(self) -> dict[str, Any]:
        return {"dataset": str(self._inner), "artifact_path": self._artifact_path}
