"""``python -m app.limits``: the limits table the README shows, the service's rows and every served
task's (``TASK_MODULES``)."""

from __future__ import annotations

from app.core.config import Settings
from app.core.limits_table import Limit, limits, limits_markdown
from app.tasks import load_slices, tasks_of


def table(settings: Settings) -> list[Limit]:
    return limits(settings, [row for task in tasks_of(load_slices(settings.task_modules))
                             for row in task.limits(settings)])


if __name__ == "__main__":
    print(limits_markdown(table(Settings())))
