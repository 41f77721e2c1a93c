"""Task registry: `--task NAME` picks one of `TASKS`."""

from __future__ import annotations

from typing import Literal

from fl_lightning.tasks.base import ClientPartition, FederatedData, Task, TaskSettings
from fl_lightning.tasks.toy import Toy

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (Toy,)}

TaskName = Literal["toy"]


def get_task_class(name: str) -> type[Task]:
    """Looks a task up by name, with an error listing the valid ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


__all__ = ["TASKS", "ClientPartition", "FederatedData", "Task", "TaskName", "TaskSettings", "get_task_class"]
