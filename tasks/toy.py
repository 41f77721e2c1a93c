"""A tiny synthetic task for tests and 10-second smoke runs (`--task toy`).

Not from the paper: a small MLP on 16-dimensional Gaussian clusters (4 classes), with label skew
across clients from a Dirichlet split, and an edge case in the paper's sense (Wang et al.,
"Attack of the Tails: Yes, You Really Can Backdoor Federated Learning", NeurIPS 2020,
arXiv:2007.05084): a far, sparsely populated cluster of class-1 points that the attacker labels 0.
Everything is generated from the run seed, so no files are read.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from fl_lightning.config import ClientArgs, DataArgs, FLArgs, preset
from fl_lightning.task import ClientPartition, FederatedData, Task, TaskSettings
from fl_lightning.tasks.partition import dirichlet_split, iid_split, tiled_rows

NUM_FEATURES = 16
NUM_CLASSES = 4


class Toy(Task):
    """MLP 16-32-4 with dropout (676 parameters) on synthetic clusters."""

    name = "toy"
    fl_preset = preset(FLArgs, rounds=5, num_clients=20, clients_per_round=5)
    client_preset = preset(ClientArgs, lr=0.1, lr_decay=0.99, momentum=0.9, weight_decay=1e-4, local_epochs=2,
                           batch_size=16, grad_clip_norm=0.0)
    data_preset = preset(DataArgs, partition="dirichlet")
    backdoor_target = 0
    supports_tile = True

    def __init__(self, settings: TaskSettings) -> None:
        super().__init__(settings)
        self.model = nn.Sequential(nn.Linear(NUM_FEATURES, 32), nn.ReLU(), nn.Dropout(0.1),
                                   nn.Linear(32, NUM_CLASSES))

    def forward(self, inputs: Tensor) -> Tensor:
        return self.model(inputs)

    def build_data(self) -> FederatedData:
        rng = np.random.default_rng([self.settings.seed, 7001])
        centers = rng.normal(0.0, 3.0, size=(NUM_CLASSES, NUM_FEATURES))
        num_train = 50 * self.settings.num_clients

        def sample(n: int) -> tuple[Tensor, Tensor]:
            labels = rng.integers(0, NUM_CLASSES, size=n)
            points = centers[labels] + rng.normal(0.0, 1.5, size=(n, NUM_FEATURES))
            return torch.as_tensor(points, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.int64)

        train_x, train_y = sample(num_train)
        test_x, test_y = sample(1000)
        # The edge case: class-1 points far out along one direction, which honest clients never see.
        edge_center = centers[1] + 8.0 * np.eye(NUM_FEATURES)[0]
        edge_x = torch.as_tensor(edge_center + rng.normal(0.0, 0.5, size=(200, NUM_FEATURES)), dtype=torch.float32)
        edge_y = torch.full((200,), self.backdoor_target, dtype=torch.int64)
        tile = self.settings.data.tile  # `tile` copies of the training set, as index replication (row % num_train)
        if self.settings.data.partition == "iid":
            order, offsets = iid_split(num_train * tile, self.settings.num_clients, self.settings.seed)
        else:
            order, offsets = dirichlet_split(train_y.numpy(), self.settings.num_clients, self.settings.data.alpha,
                                             self.settings.seed, min_size=5, tile=tile)
        clean = torch.as_tensor(rng.choice(num_train, 60, replace=False))
        return FederatedData(
            train_inputs=train_x, train_targets=train_y,
            partition=ClientPartition.from_csr(tiled_rows(order, num_train, tile), offsets),
            test_inputs=test_x, test_targets=test_y,
            backdoor_inputs=edge_x[100:], backdoor_targets=edge_y[100:],
            edge_train_inputs=torch.cat([edge_x[:100], train_x[clean]]),
            edge_train_targets=torch.cat([edge_y[:100], train_y[clean]]),
        )
