"""The clustering task: customer segments from the trained K-means, ad-hoc fits and colour palettes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.core.limits import (
    CLUSTERING_MAX_MAGNITUDE,
    CLUSTERING_MAX_ROWS,
    FIT_MAX_COLUMNS,
    FIT_MAX_K,
    FIT_MAX_ROWS,
    PALETTE_COLOURS,
    PALETTE_MAX_INSTANCES,
)
from app.core.limits_table import Limit
from app.tasks import Task
from app.tasks.clustering.model import MODEL_CLASS
from app.tasks.clustering.router import router
from app.tasks.clustering.v2 import V2


def limits(settings: Any) -> list[Limit]:
    return [
        Limit("clustering predict", "rows per request", f"1-{CLUSTERING_MAX_ROWS:,}",
              "422 `invalid-request`"),
        Limit("clustering fit", "rows x columns, k", f"<= {FIT_MAX_ROWS:,} x {FIT_MAX_COLUMNS}, "
              f"k 2-{FIT_MAX_K}", "422 `invalid-request`"),
        Limit("clustering predict and fit", "magnitude of any value", f"<= {CLUSTERING_MAX_MAGNITUDE:g}",
              "422 `value-out-of-range`"),
        Limit("clustering palette", "images per request", f"1-{PALETTE_MAX_INSTANCES}",
              "422 `too-many-instances`"),
        Limit("clustering palette", "colours", f"{PALETTE_COLOURS[0]}-{PALETTE_COLOURS[1]}",
              "422 `invalid-request`"),
    ]


TASK = Task("clustering", router, MODEL_CLASS, v2=V2, limits=limits, media="images",
            training="training.clustering", web=Path(__file__).parent / "web")
