"""Bulyan.

Paper: El Mhamdi, Guerraoui and Rouault, "The Hidden Vulnerability of Distributed Learning in
Byzantium", ICML 2018 (arXiv:1802.07927), §4.

With n updates of which at most f are Byzantine, and n >= 4f + 3:

1. Selection: θ = n - 2f times, apply Krum to the updates not yet selected (each score sums an
   update's `|R| - f - 2` smallest squared distances to the others of the remaining set R) and move
   the winner into the selection set S.
2. Aggregation: per coordinate, the mean of the β = θ - 2f values of S closest to that
   coordinate's median over S.

A Byzantine update that Krum lets into S can still move each coordinate only within the range of
the honest values around the median, which is what bounds the attack in the paper's Theorem 2.

Bulyan ignores example counts, as in the paper. The median of an even number of values is the mean
of the two middle ones; ties in Krum's scores go to the lowest index, ties in the distance to the
median to the lower value. Krum needs more than f + 2 updates, which the last f - 1 selection steps
do not have: there each remaining update is scored by its nearest neighbour alone.
The updates left out of S are reported as `flagged` (the detection metrics).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fl_lightning.aggregation import Aggregate, Aggregator
from fl_lightning.callbacks.krum import krum_scores
from fl_lightning.config import ConfigError, FLArgs, check_argument, check_int
from fl_lightning.kernels import by_column_chunks, pairwise_sq_distances, sort_columns


class Bulyan(Aggregator):
    """Bulyan: recursive Krum selection of n - 2f updates, then a coordinate-wise trimmed mean around the median.

    Args:
        num_adversaries: f, the Byzantine updates tolerated per round; a round needs n >= 4f + 3 updates.
    """

    def __init__(self, num_adversaries: int = 1) -> None:
        check_argument(self, "num_adversaries", check_int, num_adversaries, minimum=0)
        self.num_adversaries = num_adversaries

    def check_run(self, fl: FLArgs) -> None:
        m, f = fl.clients_per_round, self.num_adversaries
        if m < 4 * f + 3:
            raise ConfigError(f"--aggregator.num_adversaries={f}: Bulyan needs at least 4 * f + 3 = {4 * f + 3} "
                              f"updates per round but --fl.clients_per_round={m}; allowed: 0..{max((m - 3) // 4, 0)} "
                              "at this m, or sample more clients per round")

    def aggregate(self, deltas: Tensor, weights: Tensor, generator: torch.Generator) -> Aggregate:
        n, f = deltas.shape[0], self.num_adversaries
        if n < 4 * f + 3:
            raise ValueError(f"Bulyan with num_adversaries={f} needs at least 4 * f + 3 = {4 * f + 3} updates per "
                             f"round, got {n}")
        selected = bulyan_selection(pairwise_sq_distances(deltas), f)  # [θ]
        flagged = torch.ones(n, dtype=torch.bool)
        flagged[selected] = False
        update = trimmed_mean_around_median(deltas, keep=len(selected) - 2 * f, rows=selected.to(deltas.device))
        return Aggregate(update=update, client_weights=None, flagged=flagged)


def bulyan_selection(sq_dists: Tensor, num_adversaries: int) -> Tensor:
    """The indices Bulyan selects, in selection order: θ = n - 2f rounds of Krum over the updates left.

    Args:
        sq_dists: Pairwise squared distances of all n updates, `[n, n]`.
        num_adversaries: f.

    Returns:
        `[n - 2f]` int64 indices into the n updates.
    """
    n = sq_dists.shape[0]
    remaining = torch.arange(n)
    selected = []
    for _ in range(n - 2 * num_adversaries):
        # Krum over the remaining set R: |R| - f - 2 nearest neighbours, and at least the nearest one once
        # fewer than f + 3 updates are left (the last f - 1 picks; Krum itself is undefined there).
        sub = sq_dists[remaining][:, remaining]  # [|R|, |R|]
        neighbours = max(len(remaining) - num_adversaries - 2, 1)
        scores = krum_scores(sub, len(remaining) - 2 - neighbours)  # [|R|]
        winner = int(scores.sort(stable=True).indices[0])
        selected.append(int(remaining[winner]))
        remaining = torch.cat([remaining[:winner], remaining[winner + 1:]])
    return torch.tensor(selected, dtype=torch.int64)


def trimmed_mean_around_median(deltas: Tensor, keep: int, rows: Tensor | None = None) -> Tensor:
    """Per coordinate, the mean of the `keep` values closest to the median of `deltas[rows]` (`[θ, n_params]`;
    `rows` None: all of them), `[n_params]`. The rows are picked chunk by chunk, never copied whole.

    The `keep` values nearest the median of a sorted column are consecutive: the window of `keep`
    ranks, out of the `θ - keep + 1` possible, whose farther end is nearest the median (ties: the
    lower window). Its sum is the column's total less the ranks below and above the window.
    """
    theta = deltas.shape[0] if rows is None else rows.shape[0]
    dropped = theta - keep  # ranks left out of the window, below and above it together

    def reduce(block: Tensor) -> Tensor:  # [n, cols] -> [cols]
        ordered = sort_columns(block if rows is None else block[rows]).contiguous()  # [θ, cols]
        median = (ordered[(theta - 1) // 2] + ordered[theta // 2]) / 2  # [cols]
        below = torch.cumsum(ordered[:dropped], dim=0)  # [dropped, cols]: sums of the lowest 1..dropped ranks
        above = torch.cumsum(ordered.flip(0)[:dropped], dim=0)  # the same from the top
        total = ordered.sum(dim=0)
        best_reach, best_sum = None, None
        for start in range(dropped + 1):  # the window [start, start + keep)
            reach = torch.maximum(median - ordered[start], ordered[start + keep - 1] - median)
            window = total - (below[start - 1] if start else 0) - (above[dropped - start - 1] if start < dropped else 0)
            if best_reach is None:
                best_reach, best_sum = reach, window
            else:
                closer = reach < best_reach  # strictly: a tie keeps the lower window
                best_reach, best_sum = torch.where(closer, reach, best_reach), torch.where(closer, window, best_sum)
        return best_sum / keep

    return by_column_chunks(deltas, reduce)
