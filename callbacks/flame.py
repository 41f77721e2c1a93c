"""FLAME.

Paper: Nguyen, Rieger, Chen, Yalame, Möllering, Fereidooni, Marchal, Miettinen, Mirhoseini, Zeitouni,
Koushanfar, Sadeghi and Schneider, "FLAME: Taming Backdoors in Federated Learning", USENIX Security
2022 (arXiv:2101.02281), Algorithm 1.

Each round, with n updates:

1. Filtering: the pairwise cosine distances `c_ij = 1 - <Δ_i, Δ_j> / (|Δ_i| |Δ_j|)` are clustered by
   HDBSCAN (precomputed distances, `min_cluster_size = n // 2 + 1`, `min_samples = 1`, a single
   cluster allowed); the updates of the largest cluster are admitted, the others (noise points
   and minority clusters) are left out.
2. Adaptive clipping: S_t is the median of all n update norms `e_i = |Δ_i|` (for even n the mean of the
   two middle ones); each admitted update is
   scaled by `min(1, S_t / e_i)`, and the admitted updates are averaged without example weights.
3. Adaptive noise: Gaussian noise of standard deviation `σ = λ S_t` per coordinate is added to the
   new global model (the paper: λ = 0.001 for image classification, 0.01 for word prediction and
   network intrusion detection).

Deviation, as the public implementations (FLPoison, BackFed) do: cosine distances are taken between
the updates, not between the local models. All local models share the global model, so their
cosines differ from 1 by amounts of the order of `|Δ|^2 / |w|^2`, which float32 models cannot resolve;
between the updates the geometry is the same up to that shared offset. If HDBSCAN finds no cluster
(every update a noise point), all updates are admitted, so a round is never dropped.

Clustering is scikit-learn's `HDBSCAN`, deterministic for a given input; the noise comes from the
round's generator. Left-out updates are reported as `flagged` (the detection metrics).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from fl_lightning.aggregation import Aggregate, Aggregator
from fl_lightning.config import check_argument, check_non_negative
from fl_lightning.kernels import gram_matrix, weighted_sum


class FLAME(Aggregator):
    """FLAME: HDBSCAN over the updates' cosine distances, clipping to the median norm, noise scaled by it.

    Args:
        noise_lambda: λ; the noise's standard deviation is λ times the median update norm (the paper:
            0.001 for image classification, 0.01 for word prediction).
    """

    def __init__(self, noise_lambda: float = 0.001) -> None:
        check_argument(self, "noise_lambda", check_non_negative, noise_lambda)
        self.noise_lambda = noise_lambda

    def aggregate(self, deltas: Tensor, weights: Tensor, generator: torch.Generator) -> Aggregate:
        n = deltas.shape[0]
        gram = gram_matrix(deltas).cpu().double()  # [n, n]
        norms = gram.diagonal().clamp_min(0).sqrt()  # [n], e_i
        admitted = largest_cluster(cosine_distances(gram, norms))  # bool [n]
        bound = float(norms.median()) if n % 2 else float(norms.sort().values[n // 2 - 1: n // 2 + 1].mean())
        scale = torch.where(norms > bound, bound / norms.clamp_min(1e-30), torch.ones_like(norms))  # min(1, S/e)
        coefficients = torch.where(admitted, scale / int(admitted.sum()), torch.zeros_like(scale))  # [n]
        update = weighted_sum(deltas, coefficients.tolist(), deltas.dtype)
        noise = (self.noise_lambda * bound) * torch.randn(update.shape, generator=generator, dtype=update.dtype)
        client_weights = admitted.double() / int(admitted.sum())
        return Aggregate(update=update, client_weights=client_weights.to(deltas.device, deltas.dtype),
                         noise=noise.to(update.device), flagged=~admitted)


def cosine_distances(gram: Tensor, norms: Tensor) -> Tensor:
    """`1 - cos(Δ_i, Δ_j)` from the Gram matrix `[n, n]` and the norms `[n]`, in [0, 2], zero diagonal."""
    cosine = gram / (norms[:, None] * norms[None, :]).clamp_min(1e-30)
    distances = (1.0 - cosine).clamp(0.0, 2.0)
    distances.fill_diagonal_(0.0)
    return distances


def largest_cluster(distances: Tensor) -> Tensor:
    """The members of HDBSCAN's largest cluster (ties: the lowest label), bool `[n]`; all when it finds none."""
    from sklearn.cluster import HDBSCAN  # imported here: only FLAME needs scikit-learn at run time

    n = distances.shape[0]
    if n < 3:  # no majority cluster to tell apart
        return torch.ones(n, dtype=torch.bool)
    labels = HDBSCAN(metric="precomputed", min_cluster_size=n // 2 + 1, min_samples=1,
                     allow_single_cluster=True, copy=True).fit_predict(distances.numpy())
    clustered = labels[labels >= 0]
    if clustered.size == 0:
        return torch.ones(n, dtype=torch.bool)
    return torch.from_numpy(labels == np.bincount(clustered).argmax())
