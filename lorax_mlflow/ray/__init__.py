"""Ray Serve: N engine replicas of an MLflow model behind an adapter-affinity ingress.

Needs the ``ray`` extra (``pip install lorax-mlflow[ray]``). `build_app` makes the application,
`app_builder` is the ``import_path`` for ``serve run`` config files, `run_local` is what
``lorax-mlflow serve --replicas N`` runs. `AdapterOwnerRouter` is the replicas' Serve request
router: each adapter to its owner replica by rendezvous hashing, bounded by `LoadBound`.
"""

from lorax_mlflow.ray.adapter_owner import LoadBound, choose_replica
from lorax_mlflow.ray.adapter_router import AdapterOwnerRouter
from lorax_mlflow.ray.deployments import (
    ADAPTER_LOADS_HEADER,
    REPLICA_HEADER,
    app_builder,
    build_app,
    routed_adapter_id,
)
from lorax_mlflow.ray.local import run_local, start_local_cluster

__all__ = ["ADAPTER_LOADS_HEADER", "REPLICA_HEADER", "AdapterOwnerRouter", "LoadBound", "app_builder", "build_app",
           "choose_replica", "routed_adapter_id", "run_local", "start_local_cluster"]
