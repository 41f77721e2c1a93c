"""Krum and Multi-Krum.

Paper: Blanchard, El Mhamdi, Guerraoui and Stainer, "Machine Learning with Adversaries: Byzantine
Tolerant Gradient Descent", NeurIPS 2017.

With n updates of which at most f are Byzantine, the score of update i is the sum of its squared
distances to its `n - f - 2` nearest other updates, `s(i) = sum_{j in N_i} |V_i - V_j|^2`. Krum
returns the update of lowest score; Multi-Krum averages the m updates of lowest score.

The rules act on the stacked client updates `[n, n_params]` (the reference acts on the local
models; since all of them start from the same global model, pairwise distances are the same).

Deviations from the reference code (`defense.py` of Wang et al.; see `docs/reference-deviations.md`):
    - The pairwise squared distances come from one Gram matrix
      (`fl_lightning.kernels.pairwise_sq_distances`) instead of a Python loop over pairs in numpy on
      the CPU.
    - Multi-Krum weights each selected update by its own example count. The reference prepends the
      attacker's count to the list even in rounds without an attacker, so every model got its
      neighbour's count in those rounds (`docs/reference-deviations.md`, Q11); that bug is not
      reproduced. Ties between equal scores go to the lowest index (the reference's `argpartition`
      breaks them arbitrarily).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fl_lightning.aggregation import Aggregate, Aggregator
from fl_lightning.config import ConfigError, FLArgs, check_argument, check_int
from fl_lightning.kernels import pairwise_sq_distances, weighted_sum


def krum_scores(sq_dists: Tensor, num_adversaries: int) -> Tensor:
    """Krum score of every update: the sum of its `n - f - 2` smallest squared distances to the others.

    Args:
        sq_dists: Pairwise squared distances, `[n, n]`.
        num_adversaries: f, the number of Byzantine clients tolerated.

    Returns:
        Scores, `[n]` (lower is more central).
    """
    n = sq_dists.shape[0]
    others = sq_dists.clone()
    others.fill_diagonal_(math.inf)  # an update is not its own neighbour
    nearest = others.sort(dim=1).values[:, : n - num_adversaries - 2]  # [n, n - f - 2]
    return nearest.sum(dim=1)


class MultiKrum(Aggregator):
    """Multi-Krum: the example-weighted mean of the `m` updates with the lowest Krum scores.

    Args:
        num_adversaries: f, the number of Byzantine clients tolerated per round (the paper: 1).
            Each score sums the `n - f - 2` smallest squared distances, and a round needs
            `n > 2f + 2` updates.
        num_selected: m, how many updates are averaged; None means `n - f` (the reference).
    """

    def __init__(self, num_adversaries: int = 1, num_selected: int | None = None) -> None:
        check_argument(self, "num_adversaries", check_int, num_adversaries, minimum=0)
        if num_selected is not None:
            check_argument(self, "num_selected", check_int, num_selected, minimum=1)
        self.num_adversaries = num_adversaries
        self.num_selected = num_selected

    def check_run(self, fl: FLArgs) -> None:
        m, f = fl.clients_per_round, self.num_adversaries
        if m <= 2 * f + 2:
            raise ConfigError(f"--aggregator.num_adversaries={f}: {type(self).__name__} needs more than 2 * f + 2 = "
                              f"{2 * f + 2} updates per round but --fl.clients_per_round={m}; allowed: "
                              f"0..{max((m - 3) // 2, 0)} at this m, or sample more clients per round")
        if self.selection_size(m) > m:
            raise ConfigError(f"--aggregator.num_selected={self.num_selected}: more than the "
                              f"--fl.clients_per_round={m} updates of a round; allowed: 1..{m}")

    def selection_size(self, n: int) -> int:
        """m for a round of `n` updates."""
        return n - self.num_adversaries if self.num_selected is None else self.num_selected

    def aggregate(self, deltas: Tensor, weights: Tensor, generator: torch.Generator) -> Aggregate:
        n = deltas.shape[0]
        name = type(self).__name__
        if n <= 2 * self.num_adversaries + 2:
            raise ValueError(f"{name} with num_adversaries={self.num_adversaries} needs more than "
                             f"2 * num_adversaries + 2 = {2 * self.num_adversaries + 2} updates per round, got {n}; "
                             f"lower num_adversaries or sample more clients per round")
        num_selected = self.selection_size(n)
        if num_selected > n:
            raise ValueError(f"{name} num_selected={num_selected} must be in 1..{n} (the number of updates)")
        scores = krum_scores(pairwise_sq_distances(deltas), self.num_adversaries)  # [n]
        selected = scores.sort(stable=True).indices[:num_selected]  # stable: ties go to the lowest index
        selection = torch.zeros(n, dtype=torch.float64)  # [n]
        selection[selected] = weights.detach().to("cpu", torch.float64)[selected]
        if selection.sum() == 0:  # only clients without examples selected: weigh them equally, not 0 / 0
            selection[selected] = 1.0
        selection /= selection.sum()  # example counts renormalised over the selected updates
        client_weights = selection.to(deltas.device, deltas.dtype)
        if num_selected == 1:  # Krum: the chosen update itself, bitwise what the weighted sum gives
            return Aggregate(update=deltas[int(selected[0])].clone(), client_weights=client_weights)
        return Aggregate(update=weighted_sum(deltas, selection.tolist(), deltas.dtype), client_weights=client_weights)


class Krum(MultiKrum):
    """Krum: the single update with the lowest score (ties: the lowest index), with weight 1.

    Args:
        num_adversaries: f, the number of Byzantine clients tolerated per round (the paper: 1).
            Each score sums the `n - f - 2` smallest squared distances, and a round needs
            `n > 2f + 2` updates.
    """

    def __init__(self, num_adversaries: int = 1) -> None:
        super().__init__(num_adversaries=num_adversaries, num_selected=None)

    def selection_size(self, n: int) -> int:
        return 1
