"""Prediction log, drift monitoring, metrics and dashboard.

The app factory calls :func:`setup_monitoring` / :func:`shutdown_monitoring` in its lifespan and
includes :data:`app.monitoring.router.router`. They are imported lazily so that training scripts,
which only need :mod:`app.monitoring.reference`, do not import the database layer.
"""

from __future__ import annotations

from typing import Any

__all__ = ["setup_monitoring", "shutdown_monitoring"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from app.monitoring import service

        return getattr(service, name)
    raise AttributeError(f"module 'app.monitoring' has no attribute {name!r}")
