"""Task registry: `--task NAME` picks one of `TASKS`."""

from __future__ import annotations

from typing import Literal

from fl_lightning.tasks.base import ClientPartition, FederatedData, Task, TaskSettings
from fl_lightning.tasks.cifar10 import Cifar10
from fl_lightning.tasks.emnist import Emnist
from fl_lightning.tasks.imagenet import Imagenet
from fl_lightning.tasks.reddit import Reddit
from fl_lightning.tasks.sentiment140 import Sentiment140
from fl_lightning.tasks.toy import Toy

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (Toy, Sentiment140, Reddit, Emnist, Cifar10, Imagenet)}

TaskName = Literal["toy", "sentiment140", "reddit", "emnist", "cifar10", "imagenet"]


def get_task_class(name: str) -> type[Task]:
    """Looks a task up by name, with an error listing the valid ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


__all__ = ["TASKS", "ClientPartition", "FederatedData", "Task", "TaskName", "TaskSettings", "get_task_class"]
