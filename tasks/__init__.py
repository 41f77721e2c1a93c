"""Task registry: `--task NAME` picks one of `TASKS`, the built-in tasks.

Importing this package defines (and so registers, see `Task.registry`) every built-in task. This is
the registry the entry point imports; the engine itself never imports `tasks/`.
"""

from __future__ import annotations

from typing import get_args

from fl_lightning.task import ClientPartition, FederatedData, Task, TaskName, TaskSettings
from fl_lightning.tasks.cifar10 import Cifar10
from fl_lightning.tasks.emnist import Emnist
from fl_lightning.tasks.imagenet import Imagenet
from fl_lightning.tasks.reddit import Reddit
from fl_lightning.tasks.sentiment140 import Sentiment140
from fl_lightning.tasks.toy import Toy

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (Toy, Sentiment140, Reddit, Emnist, Cifar10, Imagenet)}
if sorted(TASKS) != sorted(get_args(TaskName)):  # the CLI's choices (`TaskName`) and the classes must agree
    raise ImportError(f"fl_lightning.task.TaskName {sorted(get_args(TaskName))} and the built-in tasks "
                      f"{sorted(TASKS)} differ; update both")


def get_task_class(name: str) -> type[Task]:
    """Looks a task up by name, with an error listing the valid ones."""
    return Task.by_name(name)


__all__ = ["TASKS", "ClientPartition", "FederatedData", "Task", "TaskName", "TaskSettings", "get_task_class"]
