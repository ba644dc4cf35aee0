"""Prefect: the pipeline flow derived from dvc.yaml, and its scheduled deployment."""

import stages  # noqa: F401  (its import keeps the tools' telemetry off in every flow)
