"""Coordinate-wise rules: the coordinate median and the trimmed mean.

Paper: Yin, Chen, Ramchandran and Bartlett, "Byzantine-Robust Distributed Learning: Towards
Optimal Statistical Rates", ICML 2018.

Per coordinate, the median takes the middle value of the n updates, and the beta-trimmed mean
drops the `floor(beta * n)` largest and smallest values and averages the rest. Both ignore
example counts, as in the paper.

Neither rule is in the reference code (`defense.py` of Wang et al.; see
`docs/reference-deviations.md`). The median of an even number of values is the mean of the two
middle ones.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fl_lightning.aggregation import Aggregate, Aggregator
from fl_lightning.config import ComponentError, check_argument, check_finite
from fl_lightning.kernels import by_column_chunks, sort_columns


class TrimmedMean(Aggregator):
    """Coordinate-wise trimmed mean: per coordinate, drop the `floor(beta * n)` largest and smallest values.

    Unweighted (Yin et al.); reports no client weights.

    Args:
        beta: Fraction trimmed at each end, in [0, 0.5).
    """

    def __init__(self, beta: float = 0.1) -> None:
        check_argument(self, "beta", check_finite, beta, positive=False)
        if not beta < 0.5:
            rule = "must be in [0, 0.5) (the fraction trimmed at each end)"
            raise ComponentError("TrimmedMean", "beta", f"TrimmedMean beta {rule}, got {beta!r}")
        self.beta = beta

    def aggregate(self, deltas: Tensor, weights: Tensor, generator: torch.Generator) -> Aggregate:
        n = deltas.shape[0]
        trimmed = math.floor(round(self.beta * n, 9))  # round first: 0.3 * 10 is 3.0000000000000004
        return Aggregate(update=coordinatewise_trimmed_mean(deltas, trimmed), client_weights=None)


class CoordinateMedian(Aggregator):
    """Coordinate-wise median (the mean of the two middle values for an even count).

    Unweighted (Yin et al.); reports no client weights.
    """

    def aggregate(self, deltas: Tensor, weights: Tensor, generator: torch.Generator) -> Aggregate:
        n = deltas.shape[0]
        # The median is the mean left after trimming all but the middle one (odd n) or two (even n).
        return Aggregate(update=coordinatewise_trimmed_mean(deltas, (n - 1) // 2), client_weights=None)


def coordinatewise_trimmed_mean(deltas: Tensor, trimmed: int) -> Tensor:
    """Per coordinate, the mean of the values left after dropping `trimmed` at each end, `[n_params]`."""
    n = deltas.shape[0]

    def reduce(block: Tensor) -> Tensor:  # [n, cols] -> [cols]
        return sort_columns(block)[trimmed: n - trimmed].mean(dim=0)  # mean of [n - 2 * trimmed, cols]

    return by_column_chunks(deltas, reduce)
