"""Robust learning rate (RobustLR).

Paper: Ozdayi, Kantarcioglu and Gel, "Defending against Backdoors in Federated Learning with Robust
Learning Rate", AAAI 2021 (arXiv:2007.03767), §4.

Per coordinate j, the server counts how many of the round's n updates agree in sign: if
`|sum_k sgn(Δ_kj)| >= θ` the coordinate moves by the server learning rate as usual, otherwise by its
negative, so that a coordinate pushed by a minority (a backdoor's) is pushed back. The step is the
example-weighted mean of the updates (FedAvg) times that per-coordinate sign:

    update_j = (+1 if |sum_k sgn(Δ_kj)| >= θ else -1) * sum_k n_k Δ_kj / sum_k n_k

(the engine then applies `global += server_lr * update`). The authors' runs use θ = 4 with 10 agents
per round on Fashion-MNIST (their `runner.sh`). `sgn(0) = 0`: an update that leaves a coordinate
unchanged casts no vote. The rule excludes no update, so it reports the FedAvg weights and flags none.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fl_lightning.aggregation import Aggregate, Aggregator
from fl_lightning.config import ConfigError, FLArgs, check_argument, check_int
from fl_lightning.kernels import by_column_chunks, weighted_sum


class RobustLR(Aggregator):
    """FedAvg whose step is reversed on the coordinates where fewer than `threshold` more updates agree in sign.

    Args:
        threshold: θ, the sign agreement `|sum_k sgn(Δ_kj)|` a coordinate needs to move forward (the
            paper: 4 for 10 updates per round).
    """

    def __init__(self, threshold: int = 4) -> None:
        check_argument(self, "threshold", check_int, threshold, minimum=1)
        self.threshold = threshold

    def check_run(self, fl: FLArgs) -> None:
        if self.threshold > fl.clients_per_round:
            raise ConfigError(f"--aggregator.threshold={self.threshold}: more than the --fl.clients_per_round="
                              f"{fl.clients_per_round} updates could agree, so every coordinate would move backwards;"
                              f" allowed: 1..{fl.clients_per_round}")

    def aggregate(self, deltas: Tensor, weights: Tensor, generator: torch.Generator) -> Aggregate:
        shares = weights.detach().to("cpu", torch.float64)
        shares = shares / shares.sum() if shares.sum() > 0 else torch.full_like(shares, 1.0 / len(shares))
        mean = weighted_sum(deltas, shares.tolist(), deltas.dtype)  # [n_params]
        agreement = by_column_chunks(deltas, lambda block: block.sign().sum(dim=0))  # [n_params], integers
        direction = torch.where(agreement.abs() >= self.threshold, 1.0, -1.0).to(mean.dtype)
        return Aggregate(update=mean * direction.to(mean.device),
                         client_weights=shares.to(deltas.device, deltas.dtype))
