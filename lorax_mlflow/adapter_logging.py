"""`log_adapter`: keep a PEFT adapter in MLflow (a run's artifacts, optionally a registered model version).

A served model then uses it by URI: ``runs:/<run_id>/<name>``, ``models:/<registered name>/<version>``
or ``models:/<registered name>@<alias>``. The adapter is logged with the identity of the base
model it was trained for (`lorax_mlflow.adapters.base_identity`), so serving it on another base
fails with a clear 400 instead of silently wrong outputs.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from lorax_mlflow.adapters.base_identity import IDENTITY_FILE, write_base_identity
from lorax_mlflow.adapters.peft_format import CONFIG_FILE

logger = logging.getLogger(__name__)

BASE_MODEL_TAG = "lorax.base_model"


@dataclass(frozen=True)
class AdapterInfo:
    run_id: str
    artifact_path: str
    base_model: str
    registered_model_name: str | None = None
    version: str | None = None

    @property
    def run_uri(self) -> str:
        return f"runs:/{self.run_id}/{self.artifact_path}"

    @property
    def adapter_uri(self) -> str:
        """The id a request names the adapter by: the registered version if any, else the run's artifacts."""
        if self.version is not None:
            return f"models:/{self.registered_model_name}/{self.version}"
        return self.run_uri


def log_adapter(
    peft_folder: str | Path,
    name: str = "adapter",
    *,
    registered_model_name: str | None = None,
    base_model: str | None = None,
) -> AdapterInfo:
    """Log the PEFT adapter in `peft_folder` to the active run (one is started if none is active).

    ``base_model``: the base it was trained for; default: ``base_model_name_or_path`` from its
    adapter_config.json. ``registered_model_name``: also create a new version of that registered
    model (point an alias at it with ``MlflowClient().set_registered_model_alias``).
    """
    folder = Path(peft_folder)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} is not a PEFT adapter folder (no {CONFIG_FILE})")
    base_model = base_model or json.loads(config_path.read_text()).get("base_model_name_or_path")
    if not base_model:
        raise ValueError(f"{config_path} names no base_model_name_or_path: pass base_model=")
    with tempfile.TemporaryDirectory() as staging:
        staged = Path(staging) / name
        shutil.copytree(folder, staged, ignore=shutil.ignore_patterns(IDENTITY_FILE))
        write_base_identity(staged, base_model)
        run = mlflow.active_run()
        started = run is None
        run = run or mlflow.start_run()
        try:
            mlflow.log_artifacts(str(staged), artifact_path=name)
            mlflow.set_tag(BASE_MODEL_TAG, base_model)
            artifact_uri = mlflow.get_artifact_uri(name)
        finally:
            if started:
                mlflow.end_run()
    info = AdapterInfo(run.info.run_id, name, base_model)
    if registered_model_name is None:
        return info
    client = MlflowClient()
    try:
        client.get_registered_model(registered_model_name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(registered_model_name)
    version = client.create_model_version(
        registered_model_name, source=artifact_uri, run_id=info.run_id, tags={BASE_MODEL_TAG: base_model}
    )
    logger.info("adapter %s registered as %s version %s", folder, registered_model_name, version.version)
    return AdapterInfo(info.run_id, name, base_model, registered_model_name, str(version.version))
