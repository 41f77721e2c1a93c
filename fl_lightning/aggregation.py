"""Server-side aggregation: the `Aggregator` contract and FedAvg.

Every defense of the paper is an aggregator over the stacked flat client updates
(`[n_clients, n_params]`, one row per client, on the device): robust rules replace FedAvg, and
norm clipping / weak DP wrap an inner aggregator. One config key, `aggregator`, spans them all.

FedAvg: McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017 (arXiv:1602.05629).

The sums themselves are in `fl_lightning.kernels`. `check_int` and `check_float` validate the
rules' constructor arguments with errors that name the rule and the field.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from fl_lightning.kernels import weighted_sum


@dataclass(frozen=True)
class Aggregate:
    """What an aggregator returns.

    Attributes:
        update: The step to add to the global model, `[n_params]`.
        client_weights: The weight each client effectively got, `[n_clients]`, summing to 1 where
            the rule is a weighted mean (one-hot for Krum, the selection for Multi-Krum, the
            Weiszfeld weights for RFA); `None` for coordinate-wise rules that have no such weights.
        noise: Added to the new global model after the server step, not scaled by the server step
            size (weak DP's Gaussian noise), `[n_params]`; `None` for none.
    """

    update: Tensor
    client_weights: Tensor | None
    noise: Tensor | None = None

    def apply_(self, global_params: Tensor, server_lr: float) -> None:
        """`global_params += server_lr * update`, then `+= noise`, in place."""
        global_params.add_(self.update, alpha=server_lr)
        if self.noise is not None:
            global_params.add_(self.noise)


class Aggregator(ABC):
    """Turns the round's client updates into one global update.

    Subclasses implement `aggregate`. They must be pure in their inputs (and the generator they are
    handed): every rank calls them on identical `RoundUpdates`, and a resumed run calls them again.
    Store each constructor argument under an attribute of the same name: that is how the resolved
    configuration of a run is written back (`fl_lightning.config.component_config`).
    """

    @abstractmethod
    def aggregate(self, deltas: Tensor, weights: Tensor, generator: torch.Generator) -> Aggregate:
        """Aggregate one round.

        Args:
            deltas: Client updates (local minus global model), `[n_clients, n_params]`.
            weights: Example counts of the clients, `[n_clients]`, float.
            generator: Seeded by (seed, round) for rules that draw random numbers (weak DP); a CPU
                generator, so draws do not depend on the device.

        Returns:
            The aggregate update and the weight each client got.
        """

    def __call__(self, deltas: Tensor, weights: Tensor, generator: torch.Generator) -> Aggregate:
        if deltas.ndim != 2 or weights.shape != (deltas.shape[0],):
            raise ValueError(f"expected deltas [n, n_params] and weights [n], got {tuple(deltas.shape)} and "
                             f"{tuple(weights.shape)}")
        return self.aggregate(deltas, weights.to(deltas.dtype), generator)


class FedAvg(Aggregator):
    """Example-count weighted mean of the client updates (the paper's no-defense baseline)."""

    def aggregate(self, deltas: Tensor, weights: Tensor, generator: torch.Generator) -> Aggregate:
        client_weights = weights / weights.sum()  # [n]
        return Aggregate(update=weighted_sum(deltas, client_weights), client_weights=client_weights)


def check_int(owner: object, name: str, value: int, minimum: int) -> None:
    """Raises a ValueError naming `owner`'s field unless `value` is an integer >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{type(owner).__name__} {name} must be an integer >= {minimum}, got {value!r}")


def check_float(owner: object, name: str, value: float, positive: bool) -> None:
    """Raises a ValueError naming `owner`'s field unless `value` is a finite number > 0 (or >= 0)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise ValueError(f"{type(owner).__name__} {name} must be a finite number {'> 0' if positive else '>= 0'}, "
                         f"got {value!r}")
