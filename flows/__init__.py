"""Prefect orchestration of the DVC stages: flows/pipeline.py (one run), flows/continuous.py (continuous
training ticks), flows/deploy.py (scheduled and continuous deployments). The flows only wire: DVC
decides what is up to date, the stages do the work, MLflow records it.
"""
import os

# Before Prefect reads its settings (at import): no telemetry, and enough time for the temporary
# local server's first start on a slow machine.
for _key, _value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "DO_NOT_TRACK": "1",  # Prefect's client telemetry (and its notice on an interactive console)
    # MLflow's artifact up/download bars would break through the quiet console (flows/console.py).
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}.items():
    os.environ.setdefault(_key, _value)
