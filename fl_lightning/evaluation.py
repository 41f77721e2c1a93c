"""Evaluation of a model on the task's main test set and its backdoor (edge-case) test set.

Used by `fit` after every due round and by `validate` (sharded over ranks: each rank takes every
`world_size`-th example and the counts are summed, so no example is seen twice), and by attacks
that measure their own model before sending it (`sharded=False`: one rank, the whole sets).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fl_lightning.distributed import all_reduce_sum
from fl_lightning.params import load_flat_params_
from fl_lightning.server import split_test_rows

if TYPE_CHECKING:
    from lightning.fabric import Fabric

    from fl_lightning.task import FederatedData, Task


class Evaluator:
    """Main-task accuracy and loss, and backdoor accuracy, of the task's model.

    Args:
        fabric: The run's Fabric.
        task: The task; its model is the rank's one model.
        data: The task's data (its `test_*` and `backdoor_*` tensors).
        batch_size: Evaluation batch size.
        sharded: Split the sets over ranks and sum the counts (every rank must call); False: this
            rank alone evaluates the whole sets (no collective).
        main_subset: Measure the main task on this many test examples, a fixed draw independent of
            the run's seed (0, or at least the test set's size: all of them).
        server_examples: Test rows set aside for the server (`Aggregator.server_examples`), never
            evaluated on (`fl_lightning.server.split_test_rows`).
    """

    def __init__(self, fabric: Fabric, task: Task, data: FederatedData, batch_size: int, sharded: bool = True,
                 main_subset: int = 0, server_examples: int = 0) -> None:
        self.fabric, self.task, self.batch_size, self.sharded = fabric, task, batch_size, sharded
        rank, world = (fabric.global_rank, fabric.world_size) if sharded else (0, 1)
        test_inputs, test_targets = data.test_inputs, data.test_targets
        keep, _ = split_test_rows(test_inputs.shape[0], main_subset, server_examples)
        if keep is not None:
            keep = keep.to(test_inputs.device)
            test_inputs, test_targets = test_inputs[keep], test_targets[keep]
        self.sets = {"main": (test_inputs[rank::world].contiguous(), test_targets[rank::world].contiguous())}
        if data.backdoor_inputs is not None:
            self.sets["backdoor"] = (data.backdoor_inputs[rank::world].contiguous(),
                                     data.backdoor_targets[rank::world].contiguous())

    @torch.no_grad()
    def __call__(self, global_params: Tensor | None = None) -> dict[str, float]:
        """`main_acc`, `main_loss`, `backdoor_acc` and `eval_seconds` of `global_params` (None: the current model)."""
        started = time.perf_counter()
        if global_params is not None:
            load_flat_params_(self.task, global_params)
        metrics = {}
        for split, (inputs, targets) in self.sets.items():
            sums = evaluation_sums(self.fabric, self.task, inputs, targets, self.batch_size)
            totals = all_reduce_sum(self.fabric, sums) if self.sharded else {k: float(v) for k, v in sums.items()}
            metrics[f"{split}_acc"] = totals["correct"] / max(totals["total"], 1.0)
            metrics[f"{split}_loss"] = totals["loss_sum"] / max(totals["total"], 1.0)
        metrics.pop("backdoor_loss", None)  # the loss towards the attacker's labels says nothing new
        metrics["eval_seconds"] = time.perf_counter() - started  # part of the round's `seconds`
        return metrics


@torch.no_grad()
def evaluation_sums(fabric: Fabric, task: Task, inputs: Tensor, targets: Tensor, batch_size: int) -> dict[str, Tensor]:
    """`validation_step` sums (`correct`, `total`, `loss_sum`) of the task's current model over a dataset, this rank."""
    task.eval()
    sums = {key: torch.zeros((), device=inputs.device) for key in ("correct", "total", "loss_sum")}
    for batch_idx, start in enumerate(range(0, inputs.shape[0], batch_size)):
        with fabric.autocast():
            step = task.validation_step((inputs[start:start + batch_size], targets[start:start + batch_size]),
                                        batch_idx)
        for key, value in step.items():
            sums[key] = sums[key] + value
    return sums
