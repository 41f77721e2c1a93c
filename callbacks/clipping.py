"""Norm-difference clipping and weak differential privacy, as wrappers around an inner aggregator.

Paper: Sun, Kairouz, Suresh and McMahan, "Can You Really Backdoor Federated Learning?",
arXiv:1911.07963 (2019): clip every client's update to an L2 norm bound before averaging, and,
for "weak DP", add Gaussian noise to the new global model.

Deviations from the reference code (`defense.py` of Wang et al.; see `docs/reference-deviations.md`):
    - The norms are taken by blocks of columns in float64 (`fl_lightning.kernels.row_norms`).
    - The clipping acts on the updates `[n, n_params]` (local minus global model) the server
      receives; the reference rebuilds each local model as `w_t + clipped update`, the same thing.
    - Any aggregator can run after clipping (`inner`); the reference always runs FedAvg.
    - The weak-DP noise goes to the new global model after the server step (`Aggregate.noise`),
      so its standard deviation is `stddev` whatever `--fl.server_lr` is, as in the reference
      (which has no server step size). It is drawn from the round's seeded CPU generator, so every
      rank and every device draws the same noise. The reference's deprecated `WeakDPDefense`
      (which clips whole weights and never applies its noise) is not reproduced; its live path
      (clip, average, `AddNoise`) is.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from fl_lightning.aggregation import Aggregate, Aggregator, FedAvg, Wrapper
from fl_lightning.config import check_argument, check_finite
from fl_lightning.kernels import row_norms, weighted_sum


def clip_to_norm(deltas: Tensor, norm_bound: float) -> Tensor:
    """Scales every update whose L2 norm exceeds `norm_bound` down to that norm.

    `delta / max(1, |delta| / norm_bound)`, row by row; updates within the bound are returned
    bitwise unchanged (and `deltas` itself, not a copy, when none exceeds it).

    Args:
        deltas: Client updates, `[n, n_params]`.
        norm_bound: M, the largest L2 norm an update may keep.

    Returns:
        The clipped updates, `[n, n_params]`.
    """
    factors = clip_factors(deltas, norm_bound)  # [n]
    if bool((factors == 1.0).all()):
        return deltas
    return deltas / factors[:, None]  # x / 1.0 is x: rows within the bound stay bitwise equal


def clip_factors(deltas: Tensor, norm_bound: float) -> Tensor:
    """`max(1, |delta| / norm_bound)` for every update, `[n]`: what each row is divided by when clipped."""
    return (row_norms(deltas) / norm_bound).clamp_min(1.0)


class NormClipping(Wrapper):
    """Norm-difference clipping: every update is clipped to `norm_bound`, then `inner` aggregates them.

    Args:
        norm_bound: M, the largest L2 norm an update keeps (the paper: 2 on CIFAR-10, 1.5 on EMNIST).
        inner: The aggregator run on the clipped updates; None means FedAvg (the paper).
    """

    def __init__(self, norm_bound: float = 2.0, inner: Aggregator | None = None) -> None:
        check_argument(self, "norm_bound", check_finite, norm_bound, positive=True)
        super().__init__(inner)
        self.norm_bound = norm_bound

    def aggregate(self, deltas: Tensor, weights: Tensor, generator: torch.Generator) -> Aggregate:
        if type(self.inner) is FedAvg:
            # The mean of the clipped rows is a weighted sum of the raw rows with weights p_i / factor_i:
            # no clipped [n, n_params] copy (at 100 x 10M that copy costs 10x the sum itself).
            client_weights = weights / weights.sum()  # [n]
            row_weights = client_weights / clip_factors(deltas, self.norm_bound).to(client_weights.dtype)  # [n]
            return Aggregate(update=weighted_sum(deltas, row_weights), client_weights=client_weights)
        return self.inner(clip_to_norm(deltas, self.norm_bound), weights, generator)


class WeakDP(NormClipping):
    """Weak differential privacy: norm clipping, `inner` aggregation, then N(0, stddev^2) noise per coordinate.

    The noise is drawn once per round from the round's generator and returned as `Aggregate.noise`,
    which the orchestrator adds to the new global model after the server step, unscaled. The
    update and the client weights reported are the inner aggregator's.

    Args:
        norm_bound: M, the largest L2 norm an update keeps (the paper: 2 on CIFAR-10, 1.5 on EMNIST).
        stddev: sigma of the Gaussian noise (the paper: 0.025).
        inner: The aggregator run on the clipped updates; None means FedAvg (the paper).
    """

    def __init__(self, norm_bound: float = 2.0, stddev: float = 0.025, inner: Aggregator | None = None) -> None:
        super().__init__(norm_bound=norm_bound, inner=inner)
        check_argument(self, "stddev", check_finite, stddev, positive=False)
        self.stddev = stddev

    def aggregate(self, deltas: Tensor, weights: Tensor, generator: torch.Generator) -> Aggregate:
        result = super().aggregate(deltas, weights, generator)
        if self.stddev == 0:
            return result
        # Drawn on the CPU from the round's generator, so it is the same on every rank and device.
        noise = self.stddev * torch.randn(result.update.shape, generator=generator, dtype=result.update.dtype)
        noise = noise.to(result.update.device)  # [n_params]
        if result.noise is not None:  # an inner WeakDP: both noises land on the model
            noise += result.noise
        return replace(result, noise=noise)
