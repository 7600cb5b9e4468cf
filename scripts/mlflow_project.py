"""Entry point of the MLproject's `log_model` step (`mlflow run . -e log_model -P ...`)."""

from __future__ import annotations

import argparse
import logging

import mlflow

from lorax_mlflow.registry import adapters_from_spec, log_and_register


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-model", default="", help="local HF folder or hub id; empty: the embedded default")
    parser.add_argument("--adapters", default="demo", help="'', 'demo', a folder of PEFT folders, or name=folder,...")
    parser.add_argument("--registered-model-name", required=True)
    parser.add_argument("--alias", default="", help="alias to point at the new version; empty: none")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with mlflow.start_run():  # under `mlflow run` this resumes the project's run (MLFLOW_RUN_ID)
        log_and_register(args.registered_model_name, alias=args.alias or None, base_model=args.base_model or None,
                         adapters=adapters_from_spec(args.adapters))


if __name__ == "__main__":
    main()
