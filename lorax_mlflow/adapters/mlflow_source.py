"""Adapters kept in MLflow: ``models:/name@alias``, ``models:/name/<version>``, ``runs:/<run_id>/<path>``.

An id is first *pinned*: an alias is resolved to the version it points at now, on every request,
so moving ``@prod`` takes effect on the next request while the caches stay keyed by the immutable
``models:/name/<version>``. A pinned id is then mirrored once into
``download_dir/mlflow/<digest>`` through MLflow's artifact repositories (whatever store the
tracking server uses: local, S3, GCS, Azure, mlflow-artifacts), after checking every listed path
(no absolute paths, no ``..``) and the total size against the byte limit, before any byte is
downloaded. The tracking and registry servers are the ones MLflow is configured with
(``MLFLOW_TRACKING_URI``, ``mlflow.set_tracking_uri``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import threading
from pathlib import Path, PurePosixPath

from lorax_mlflow.errors import (
    AdapterForbiddenError,
    AdapterNotFoundError,
    AdapterValidationError,
    EngineUnavailableError,
    InvalidRequestError,
    LoraxError,
)

logger = logging.getLogger(__name__)

MLFLOW_PREFIXES = ("models:/", "runs:/")
_NAME = r"[^/@\s][^/@]*"
_MODEL_VERSION = re.compile(rf"^models:/(?P<name>{_NAME})/(?P<version>[0-9]+)$")
_MODEL_ALIAS = re.compile(rf"^models:/(?P<name>{_NAME})@(?P<alias>[\w-]+)$")
_RUN_PATH = re.compile(r"^runs:/(?P<run_id>[0-9a-zA-Z_-]+)/(?P<path>[^\s]+)$")
_COMPLETE = ".lorax-complete"


def is_mlflow_uri(adapter_id: str) -> bool:
    return adapter_id.startswith(MLFLOW_PREFIXES)


def check_mlflow_uri(uri: str) -> None:
    """Refuse ids that are not one of the three accepted shapes (a 400, before any MLflow call)."""
    run = _RUN_PATH.match(uri)
    if run is not None:
        _relative_path(run["path"], uri)
        return
    if _MODEL_VERSION.match(uri) or _MODEL_ALIAS.match(uri):
        return
    raise InvalidRequestError(
        f"{uri!r} is not an MLflow adapter URI: use models:/<name>@<alias>, models:/<name>/<version> "
        "or runs:/<run_id>/<artifact path>",
        param="adapter_id",
    )


def _relative_path(path: str, uri: str) -> str:
    parts = PurePosixPath(path).parts
    if not parts or path.startswith("/") or any(part in (".", "..") for part in parts):
        raise InvalidRequestError(f"{uri!r}: the artifact path must stay inside the run", param="adapter_id")
    return "/".join(parts)


class MlflowAdapters:
    """Pins MLflow adapter URIs to immutable versions and mirrors them to local folders."""

    def __init__(self, download_dir: Path, max_adapter_bytes: int) -> None:
        self.download_dir = Path(download_dir) / "mlflow"
        self.max_adapter_bytes = max_adapter_bytes
        self._lock = threading.Lock()

    def pin(self, uri: str) -> str:
        """``models:/name@alias`` -> ``models:/name/<version it points at now>``; other URIs as given."""
        check_mlflow_uri(uri)
        alias = _MODEL_ALIAS.match(uri)
        if alias is None:
            return uri
        from mlflow import MlflowClient

        try:
            version = MlflowClient().get_model_version_by_alias(alias["name"], alias["alias"]).version
        except Exception as exc:  # MlflowException for a missing model/alias, connection errors otherwise
            raise _mlflow_error(uri, exc) from exc
        return f"models:/{alias['name']}/{version}"

    def fetch(self, pinned: str) -> Path:
        """The local mirror of a pinned URI, downloaded once (a finished mirror is never refetched)."""
        target = (self.download_dir / hashlib.sha256(pinned.encode()).hexdigest()[:32]).resolve()
        if (target / _COMPLETE).is_file():
            return target
        with self._lock:
            if not (target / _COMPLETE).is_file():
                self._download(pinned, target)
        logger.info("adapter %s mirrored from MLflow into %s", pinned, target)
        return target

    def _download(self, pinned: str, target: Path) -> None:
        try:
            repository = _artifact_repository(pinned)
            files = self._listing(repository, pinned)
            partial = target.with_name(target.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            for path in files:
                destination = (partial / path).resolve()
                if not destination.is_relative_to(partial.resolve()):
                    raise AdapterValidationError(f"adapter {pinned!r}: artifact {path!r} escapes the adapter folder")
                destination.parent.mkdir(parents=True, exist_ok=True)
                repository.download_artifacts(path, dst_path=str(partial))
            _check_sizes(partial, pinned, self.max_adapter_bytes)
        except LoraxError:
            raise
        except Exception as exc:
            raise _mlflow_error(pinned, exc) from exc
        (partial / _COMPLETE).touch()
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)

    def _listing(self, repository, pinned: str) -> list[str]:
        """Every file's relative path, refusing unsafe paths and adapters over the byte limit."""
        files: list[str] = []
        total = 0
        pending = [None]
        while pending:
            for info in repository.list_artifacts(pending.pop()):
                path = _relative_path(info.path, pinned)
                if info.is_dir:
                    pending.append(path)
                    continue
                files.append(path)
                total += info.file_size or 0
                if total > self.max_adapter_bytes:
                    raise AdapterValidationError(
                        f"adapter {pinned!r} is larger than the limit of {self.max_adapter_bytes} bytes"
                    )
        if not files:
            raise AdapterNotFoundError(f"adapter {pinned!r}: no artifacts there")
        return files


def _artifact_repository(pinned: str):
    """The artifact repository holding a pinned URI's files (listing and download go through it)."""
    from mlflow import MlflowClient
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.tracking.artifact_utils import get_artifact_uri

    version = _MODEL_VERSION.match(pinned)
    if version is not None:
        uri = MlflowClient().get_model_version_download_uri(version["name"], version["version"])
    else:
        run = _RUN_PATH.match(pinned)
        uri = get_artifact_uri(run["run_id"], run["path"])
    return get_artifact_repository(uri)


def _check_sizes(folder: Path, pinned: str, limit: int) -> None:
    """Sizes as downloaded (a listing may omit or understate them)."""
    total = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file() and not path.is_symlink())
    if total > limit:
        raise AdapterValidationError(f"adapter {pinned!r} is larger than the limit of {limit} bytes")
    for path in folder.rglob("*"):
        if path.is_symlink():
            raise AdapterValidationError(f"adapter {pinned!r}: artifact {path.name!r} is a symlink")


def _mlflow_error(uri: str, exc: Exception) -> LoraxError:
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        code = exc.error_code
        if code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            return AdapterNotFoundError(f"adapter {uri!r} not found in MLflow: {exc.message}")
        if code in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
            return AdapterForbiddenError(f"adapter {uri!r}: the server's MLflow credentials cannot read it")
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        return AdapterNotFoundError(f"adapter {uri!r}: its artifacts are missing")
    return EngineUnavailableError(f"cannot reach MLflow for adapter {uri!r}: {exc}")
