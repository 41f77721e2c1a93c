"""RFA: the geometric median of the updates, by smoothed Weiszfeld iterations.

Paper: Pillutla, Kakade and Harchaoui, "Robust Aggregation for Federated Learning", IEEE
Transactions on Signal Processing 2022 (arXiv:1912.13445).

RFA aggregates with the weighted geometric median `argmin_z sum_k alpha_k |z - w_k|` (alpha_k:
the normalised example counts), computed by the smoothed Weiszfeld iteration
`beta_k = (alpha_k / max(nu, |z - w_k|)) / sum_j (alpha_j / max(nu, |z - w_j|))`,
`z <- sum_k beta_k w_k`, from the weighted mean, until the objective changes by less than a
relative tolerance.

The rule acts on the stacked client updates `[n, n_params]` (the reference acts on the local
models; since all of them start from the same global model, the geometric median is the same up
to that shift).

Deviations from the reference code (`defense.py` of Wang et al.; see `docs/reference-deviations.md`):
    - RFA runs the reference's smoothed Weiszfeld iteration (same start, weights, objective,
      stopping rule and defaults 500 / 1e-5 / 1e-7) in the n-dimensional space of client weights:
      with `z = sum_j beta_j w_j`, `|w_k - z|^2 = (e_k - beta)^T G (e_k - beta)`, so after one Gram
      matrix (`fl_lightning.kernels.gram_matrix`) every iteration costs O(n^2) instead of three
      passes over the updates. The iteration and the final weighted sum are float64, as in the
      reference; the Gram products are float32 per block (float64 when float32 matmuls may use TF32
      or bf16). When updates are close, the Gram matrix is that of the updates less a centre `c`
      near their mean (`fl_lightning.kernels.distance_gram`): since the weights sum to 1,
      `z - c = sum_j beta_j (w_j - c)`, so the distances are the same, and their rounding errors
      are ~1e-7 of the spread's square instead of the updates' square. (Those errors do not shrink
      with the distance: uncentred, near-identical updates got distances off by more than their
      size.) The final update is the weighted sum of the updates themselves.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fl_lightning.aggregation import Aggregate, Aggregator
from fl_lightning.config import check_argument, check_finite, check_int
from fl_lightning.kernels import distance_gram, weighted_sum


class GeometricMedian(Aggregator):
    """RFA: the example-weighted geometric median of the updates, by smoothed Weiszfeld iterations.

    Starting from the weighted mean, each iteration reweights client k by
    `alpha_k / max(smoothing, |z - w_k|)` (normalised to sum 1) and sets z to that weighted mean,
    until the objective `sum_k alpha_k |z - w_k|` changes by less than `tolerance` times its value.
    The reported client weights are those of the final iterate.

    Args:
        max_iterations: Most Weiszfeld iterations (the paper: 500).
        smoothing: nu, the floor on distances that keeps weights finite (the paper: 1e-5).
        tolerance: Relative change of the objective below which the iteration stops (the paper: 1e-7).
    """

    def __init__(self, max_iterations: int = 500, smoothing: float = 1e-5, tolerance: float = 1e-7) -> None:
        check_argument(self, "max_iterations", check_int, max_iterations, minimum=0)
        check_argument(self, "smoothing", check_finite, smoothing, positive=True)
        check_argument(self, "tolerance", check_finite, tolerance, positive=False)
        self.max_iterations = max_iterations
        self.smoothing = smoothing
        self.tolerance = tolerance

    def aggregate(self, deltas: Tensor, weights: Tensor, generator: torch.Generator) -> Aggregate:
        alpha = weights.detach().to("cpu", torch.float64)
        alpha = alpha / alpha.sum()  # [n]
        beta = self.weiszfeld_weights(distance_gram(deltas), alpha)  # [n]
        return Aggregate(update=weighted_sum(deltas, beta.tolist(), torch.float64).to(deltas.dtype),
                         client_weights=beta.to(deltas.device, deltas.dtype))

    def weiszfeld_weights(self, gram: Tensor, alpha: Tensor) -> Tensor:
        """The client weights `beta` of the final Weiszfeld iterate `z = sum_k beta_k w_k`.

        Args:
            gram: Gram matrix of the updates less any common centre, `[n, n]`, float64.
            alpha: Normalised example counts, `[n]`, float64.

        Returns:
            beta, `[n]`, float64, summing to 1.
        """
        sq_norms = gram.diagonal()  # [n]

        def distances(beta: Tensor) -> Tensor:  # |w_k - z| for z = sum_j beta_j w_j, [n]
            gram_beta = gram @ beta  # [n]: <w_k, z>
            return (sq_norms - 2 * gram_beta + beta @ gram_beta).clamp_min(0).sqrt()

        beta = alpha  # z_0: the weighted mean
        dists = distances(beta)
        objective = float(alpha @ dists)
        for _ in range(self.max_iterations):
            beta = alpha / dists.clamp_min(self.smoothing)
            beta = beta / beta.sum()
            dists = distances(beta)
            previous, objective = objective, float(alpha @ dists)
            if abs(previous - objective) < self.tolerance * objective:
                break
        return beta
