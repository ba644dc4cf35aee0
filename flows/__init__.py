"""Prefect: the pipeline flow derived from dvc.yaml, and its scheduled deployment."""
