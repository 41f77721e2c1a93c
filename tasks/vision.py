"""Shared code of the image tasks (`emnist`, `cifar10`): the uint8 image task and its edge-case data.

Wang et al., "Attack of the Tails", NeurIPS 2020, section 4: the attacker holds edge-case images
relabelled to a target mixed with clean training images; in the almost-edge and normal cases honest
clients also hold some edge-case images with their true label.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from fl_lightning.config import check_int
from fl_lightning.task import ClientPartition, FederatedData, Task, TaskSettings
from fl_lightning.tasks.partition import attach_rows


class ImageTask(Task):
    """A labelled-image task whose inputs are uint8 pixels `[B, C, H, W]`, normalised in `forward`.

    Keeping the images as bytes takes 4x less memory than floats; already-normalised float inputs
    pass through unchanged. The attacker's set sizes are `--data.edge_count` (at most `max_edge_count`)
    and `--data.clean_count`, resolved from the task's data preset.
    """

    partitions = ("dirichlet", "iid")
    refusals: ClassVar[dict[str, str]] = {"partition": "'natural' needs user ids, which this data does not have"}
    supports_tile = True
    max_edge_count: ClassVar[int | None] = None
    edge_count_hint: ClassVar[str] = ""

    def __init__(self, settings: TaskSettings, model: nn.Module, mean: tuple[float, ...],
                 std: tuple[float, ...]) -> None:
        super().__init__(settings)
        self.edge_count, self.clean_count = settings.data.edge_count, settings.data.clean_count
        self.model = model
        shape = (1, len(mean), 1, 1)
        self.register_buffer("mean", torch.tensor(mean).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(shape), persistent=False)

    @classmethod
    def setting_problems(cls, settings: TaskSettings) -> list[str | None]:
        return [*super().setting_problems(settings),
                check_int("--data.edge_count", settings.data.edge_count, 1, cls.max_edge_count, cls.edge_count_hint)]

    def forward(self, inputs: Tensor) -> Tensor:
        if inputs.dtype == torch.uint8:
            inputs = (inputs.float() / 255.0 - self.mean) / self.std  # [B, C, H, W]
        return self.model(inputs)


def image_edge_case_data(*, images: Callable[[np.ndarray], Tensor], train_x: np.ndarray, train_y: np.ndarray,
                         order: np.ndarray, offsets: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                         honest_x: np.ndarray, honest_label: int, honest_holders: list[tuple[int, np.ndarray]],
                         edge_x: np.ndarray, clean_rows: np.ndarray, target_label: int,
                         backdoor_x: np.ndarray) -> FederatedData:
    """A labelled image task's `FederatedData` with the paper's edge-case pieces.

    The honest edge holders are drawn by seed (`docs/reference-deviations.md`).

    Args:
        images: Turns an image array into the task's input tensor.
        train_x: The main training images, `[N, ...]`.
        train_y: Their labels, `[N]`.
        order: The clients' rows of the training set, CSR (with `offsets`).
        offsets: `[K + 1]`.
        test_x: The main test images.
        test_y: Their labels.
        honest_x: Edge examples that honest clients hold with their true label (almost-edge and
            normal cases; empty for the edge case), appended to the training set as rows `N...`.
        honest_label: That true label.
        honest_holders: `(client_id, indices into honest_x)` per holder (`spread_over_holders`).
        edge_x: The attacker's edge examples, labelled `target_label` in its set.
        clean_rows: Training rows mixed into the attacker's set with their own labels.
        target_label: The attacker's label for the edge examples.
        backdoor_x: The edge-case test images, labelled `target_label`.
    """
    num_train = train_y.shape[0]
    order, offsets = attach_rows(order, offsets, honest_holders, offset=num_train)
    all_x = np.concatenate([train_x, honest_x])
    all_y = np.concatenate([train_y, np.full(honest_x.shape[0], honest_label, dtype=np.int64)])
    attacker_x = np.concatenate([edge_x, train_x[clean_rows]])
    attacker_y = np.concatenate([np.full(edge_x.shape[0], target_label, dtype=np.int64), train_y[clean_rows]])
    return FederatedData(
        train_inputs=images(all_x), train_targets=torch.from_numpy(all_y),
        partition=ClientPartition.from_csr(order, offsets),
        test_inputs=images(test_x), test_targets=torch.from_numpy(test_y.astype(np.int64)),
        backdoor_inputs=images(backdoor_x),
        backdoor_targets=torch.full((backdoor_x.shape[0],), target_label, dtype=torch.int64),
        edge_train_inputs=images(attacker_x), edge_train_targets=torch.from_numpy(attacker_y),
        extras={"edge_train_is_edge": torch.arange(attacker_y.shape[0]) < edge_x.shape[0]},
    )
