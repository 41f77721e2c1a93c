"""FLDetector.

Paper: Zhang, Cao, Jia and Gong, "FLDetector: Defending Federated Learning Against Model Poisoning
Attacks via Detecting Malicious Clients", KDD 2022 (arXiv:2207.09209).

An honest client's update follows from the model it starts at; between rounds it changes roughly
as the Hessian times the change of the global model. FLDetector predicts every update from that
and flags the clients whose updates keep deviating from their prediction. With `w_t` the global
model of round t, `g_t` the round's aggregate update and a window of the N last pairs
`Δw_j = w_{j+1} - w_j`, `Δg_j = g_{j+1} - g_j` (`S = [Δw_{t-N} .. Δw_{t-1}]`, `Y` likewise, `[P, N]`):

1. Hessian-vector product, the compact L-BFGS form the paper uses (Byrd, Nocedal and Schnabel,
   Math. Programming 1994), for `v = w_t - w_{t-1}`: with `A = S^T Y` (`[N, N]`), `D = diag(A)`,
   `L` its strictly lower triangle (`L_ij = Δw_i^T Δg_j`, i > j) and `σ = Δg_{t-1}^T Δw_{t-1} /
   Δw_{t-1}^T Δw_{t-1}` (the newest pair),
   `p = [[-D, L^T], [L, σ S^T S]]^-1 [Y^T v; σ S^T v]` and `Ĥ v = σ v - [Y, σ S] p`.
2. Prediction and distance: `ĝ_t^i = g_{t-1}^i + Ĥ v`; `d_t^i = |ĝ_t^i - g_t^i|`, normalised over
   the round's clients, `d_t^i / sum_j d_t^j`.
3. Suspicion score: `s_t^i`, the mean of client i's normalised distances over the window's N rounds.
4. Attack or not: the gap statistic (Tibshirani, Walther and Hastie, JRSS B 2001) on the scores,
   min-max scaled to [0, 1]: with `W_k` the within-cluster sum of squares of the best k clusters
   and `W*_kb` that of B uniform reference draws on [0, 1], `Gap(k) = mean_b log W*_kb - log W_k`,
   `s_k = sd_b(log W*_kb) sqrt(1 + 1/B)`; the number of clusters is the smallest k with
   `Gap(k) >= Gap(k + 1) - s_{k + 1}`. One cluster: no attack, nothing is removed.
5. Otherwise k-means with k = 2 on the scores (scikit-learn `KMeans`, fixed seed and restarts);
   the cluster of the larger mean score is malicious and its updates are removed (`flagged`).

The paper's g are gradients; here they are updates (local minus global model), a negative multiple
of them. The compact form is odd in Y (Y -> -Y gives Ĥ -> -Ĥ), so the predictions are the same.

The kept updates are averaged by example count (FedAvg). The paper runs detection beside any
aggregation rule (its code offers the plain mean and defaults to the coordinate median); here the
rule is the detector followed by FedAvg of what it keeps.

Adaptation to sampled clients (deviation): the paper has every client in every round, so each has
its own last update `g_{t-1}^i` to predict from and a distance in each of the N last rounds. Here
clients are sampled (a client is rarely in two consecutive rounds) and there may be 80,000 of them,
so per-client update histories (K x P floats) are out of the question. Instead:

    - every client of round t is predicted from the previous round's aggregate update,
      `ĝ_t = g_{t-1} + Ĥ v`: one prediction per round (the paper's formula with the client's own
      last update replaced by the mean one);
    - each client keeps a scalar history of its last N normalised distances, from the rounds it
      took part in, keyed by client id (K x N floats, 6.4 MB for 80,000 clients at N = 10); its
      score is their mean, so it averages over its last N participations rather than the last N
      rounds. Two updates with the same id in one round (a virtual attacker beside its honest
      twin) each get their own distance in their score; both then enter the history, in slot order;
    - the distances are normalised by their mean instead of their sum (`d_t^i n / sum_j d_t^j`),
      so that scores from rounds with different numbers of updates (rejected ones) are on one
      scale; with a fixed n this is the paper's normalisation times n, which changes neither the
      gap statistic (it min-max scales) nor the k-means clusters.

Further deviations:

    - Flagged updates are left out of their round only. The paper then removes the detected
      clients for good and restarts training from scratch; with sampled clients the round's
      removal is the comparable step (a flagged client's high score stays in its history, so it
      tends to be flagged again when sampled again).
    - `W_k` in the gap statistic is the exact optimum of k-means in one dimension (contiguous
      clusters of the sorted scores, by dynamic programming; Wang and Song, R Journal 2011) rather
      than a k-means++ run: the same objective, which k-means with restarts reaches on 1-D data in
      practice, deterministic and without the 70+ scikit-learn fits per round. The reference draws
      come from the round's generator. `Gap(k)` averages the logs as Tibshirani et al. do (the
      authors' code takes the log of the mean). Defaults follow the authors' code: B = 10 draws, at
      most 7 clusters (fewer with fewer than 8 updates) and 10 k-means restarts (scikit-learn's
      default then).
    - Rounds before the window holds N pairs (the first N + 1 rounds the rule aggregates; no pair
      exists before its second round) predict nothing, record no distance and flag nothing. Rounds
      where the product cannot be formed (a zero model change, a singular system) flag nothing.
      `flagged` is reported every round (all False when nothing is removed), so the detection
      metrics read 0 rather than missing in those rounds.

State, all tensors saved in the checkpoint so a killed and resumed run continues bitwise: the window
(`2 (N + 1)` rows of P, in the updates' dtype: N pairs plus the slot of the round's pending pair),
the previous global model and aggregate update (P each), and the per-client distance histories.
Costs per round: one Gram matrix of the window, one pass over the window for the prediction, one
over the updates for the distances and one for the mean.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fl_lightning.aggregation import Aggregate, Aggregator, RoundContext
from fl_lightning.config import check_argument, check_int
from fl_lightning.kernels import NORM_BLOCK, gram_matrix, weighted_sum

DISTANCE_CHUNK_BYTES = 2 << 20
"""Bytes of the `[n, chunk]` difference the distance pass holds at once on CPUs: it stays in the cache (at
100 x 2M, 10% faster than 26 MB chunks). GPUs take `DISTANCE_CHUNK_BYTES_GPU`, to launch fewer kernels."""
DISTANCE_CHUNK_BYTES_GPU = 256 << 20
_TINY = 1e-300
"""Floor of the within-cluster sums before their log (identical points give 0)."""


class FLDetector(Aggregator):
    """FLDetector: flags clients whose updates keep deviating from an L-BFGS prediction, then FedAvg of the rest.

    Args:
        window: N, the secant pairs of the L-BFGS approximation and the distances a client's
            score averages over (the paper: 10).
        gap_draws: B, the uniform reference draws of the gap statistic (the authors' code: 10).
        max_clusters: The most clusters the gap statistic considers (the authors' code: 7).
        kmeans_restarts: `n_init` of the 2-means clustering (fixed seed: deterministic).
    """

    def __init__(self, window: int = 10, gap_draws: int = 10, max_clusters: int = 7, kmeans_restarts: int = 10) -> None:
        check_argument(self, "window", check_int, window, minimum=1)
        check_argument(self, "gap_draws", check_int, gap_draws, minimum=2)
        check_argument(self, "max_clusters", check_int, max_clusters, minimum=2)
        check_argument(self, "kmeans_restarts", check_int, kmeans_restarts, minimum=1)
        self.window, self.gap_draws, self.max_clusters = window, gap_draws, max_clusters
        self.kmeans_restarts = kmeans_restarts
        self.pairs = torch.zeros(0)  # [2 (N + 1), P]: Δw in rows 0..N, Δg in rows N+1..2N+1, slot j = pair j % (N + 1)
        self.num_pairs = torch.zeros((), dtype=torch.int64)  # pairs completed so far
        self.last_global = torch.zeros(0)  # [P], w_{t-1}
        self.last_update = torch.zeros(0)  # [P], g_{t-1}
        self.client_ids = torch.zeros(0, dtype=torch.int64)  # [k], the clients scored so far, sorted
        self.distances = torch.zeros(0, window, dtype=torch.float64)  # [k, N], newest last, NaN: none yet
        self._context: RoundContext | None = None

    def begin_round(self, context: RoundContext) -> None:
        self._context = context

    def state_dict(self) -> dict[str, Tensor]:
        return {"pairs": self.pairs, "num_pairs": self.num_pairs, "last_global": self.last_global,
                "last_update": self.last_update, "client_ids": self.client_ids, "distances": self.distances}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state["pairs"].numel() and state["pairs"].shape[0] != 2 * (self.window + 1):
            raise ValueError(f"FLDetector window={self.window}, but the checkpoint holds "
                             f"{state['pairs'].shape[0] // 2 - 1} pairs")
        # Copies, not the loaded tensors: a checkpoint's tensors may sit at any offset in memory, and BLAS
        # products round differently on unaligned operands, so the scores would differ in the last bits.
        state = {name: tensor.clone() for name, tensor in state.items()}
        self.pairs, self.num_pairs = state["pairs"], state["num_pairs"]
        self.last_global, self.last_update = state["last_global"], state["last_update"]
        self.client_ids, self.distances = state["client_ids"], state["distances"]

    def aggregate(self, deltas: Tensor, weights: Tensor, generator: torch.Generator) -> Aggregate:
        if self._context is None:
            raise ValueError("FLDetector needs the round's global model: call begin_round before aggregate")
        n, n_params = deltas.shape
        global_params = self._context.global_params.detach().to(deltas.device, deltas.dtype)  # [P], w_t
        slot = self._pending_slot(deltas)  # the row the pair (w_t - w_{t-1}, g_t - g_{t-1}) goes to, or None
        flagged = torch.zeros(n, dtype=torch.bool)
        if slot is not None:
            torch.sub(global_params, self.last_global, out=self.pairs[slot])  # v = w_t - w_{t-1}
            prediction = self.predict(slot)  # [P] or None
            if prediction is not None:
                distance = distances_to(deltas, prediction)  # [n], |ĝ_t - g_t^i|
                total = float(distance.sum())
                normalised = distance * (n / total) if total > 0 else torch.zeros_like(distance)
                scores = self.record(self._context.client_ids.cpu(), normalised)  # [n]
                if gap_statistic_clusters(scores, self.gap_draws, self.max_clusters, generator) > 1:
                    flagged = larger_cluster(scores, self.kmeans_restarts)
        counts = weights.detach().to("cpu", torch.float64) * (~flagged).double()  # [n]
        shares = counts / counts.sum()
        update = weighted_sum(deltas, shares.tolist(), deltas.dtype)  # [P]
        if slot is not None:
            torch.sub(update, self.last_update, out=self.pairs[self.window + 1 + slot])  # g_t - g_{t-1}
            self.num_pairs = self.num_pairs + 1
        self.last_global = global_params.clone()  # the global model is updated in place after the round
        self.last_update = update.clone()
        return Aggregate(update=update, client_weights=shares.to(deltas.device, deltas.dtype), flagged=flagged)

    def _pending_slot(self, deltas: Tensor) -> int | None:
        """The window slot of this round's pair (allocating the window), or None in the rule's first round."""
        if self.last_global.numel() == 0:
            return None
        device, dtype = deltas.device, deltas.dtype
        self.last_global = self.last_global.to(device, dtype)
        self.last_update = self.last_update.to(device, dtype)
        if self.pairs.numel() == 0:
            self.pairs = torch.zeros(2 * (self.window + 1), deltas.shape[1], dtype=dtype, device=device)
        self.pairs = self.pairs.to(device, dtype)
        return int(self.num_pairs) % (self.window + 1)

    def predict(self, slot: int) -> Tensor | None:
        """`ĝ_t = g_{t-1} + Ĥ v` with `v` in row `slot` of the window, `[P]`; None while the window is not full."""
        q, size = int(self.num_pairs), self.window + 1
        if q < self.window:
            return None
        order = [(q - self.window + j) % size for j in range(self.window)]  # the N pairs, oldest first
        gram = gram_matrix(self.pairs)  # [2 (N + 1), 2 (N + 1)], float64
        s_rows, y_rows = torch.tensor(order), torch.tensor(order) + size
        coefficients = lbfgs_coefficients(gram[s_rows][:, s_rows], gram[s_rows][:, y_rows],
                                          gram[s_rows, slot], gram[y_rows, slot])
        if coefficients is None:
            return None
        sigma, on_s, on_y = coefficients
        row_weights = torch.zeros(2 * size, dtype=torch.float64)  # [2 (N + 1)]
        row_weights[s_rows], row_weights[y_rows] = on_s, on_y
        row_weights[slot] += sigma  # σ v: v is the pending slot's Δw
        prediction = weighted_sum(self.pairs, row_weights.tolist(), self.pairs.dtype)  # Ĥ v
        return prediction.add_(self.last_update)

    def record(self, ids: Tensor, normalised: Tensor) -> Tensor:
        """Each update's score (mean of its client's last N - 1 distances and this one), then adds the distances.

        Args:
            ids: The round's client ids, `[n]` int64.
            normalised: Their normalised distances, `[n]` float64.

        Returns:
            The suspicion scores, `[n]` float64.
        """
        new = ids[~torch.isin(ids, self.client_ids)].unique()
        if new.numel():
            merged = torch.cat([self.client_ids, new])
            order = merged.argsort()
            blank = torch.full((new.numel(), self.window), math.nan, dtype=torch.float64)
            self.client_ids, self.distances = merged[order], torch.cat([self.distances, blank])[order]
        rows = torch.searchsorted(self.client_ids, ids)  # [n]
        recent = torch.cat([self.distances[rows, 1:], normalised[:, None]], dim=1)  # [n, N]
        scores = recent.nanmean(dim=1)
        for row, value in zip(rows.tolist(), normalised.tolist()):  # slot order: duplicate ids stack up
            self.distances[row] = torch.cat([self.distances[row, 1:], torch.tensor([value], dtype=torch.float64)])
        return scores


def lbfgs_coefficients(s_s: Tensor, s_y: Tensor, s_v: Tensor, y_v: Tensor) -> tuple[float, Tensor, Tensor] | None:
    """The compact L-BFGS product `Ĥ v = σ v + S a + Y b` as (σ, a, b), from inner products only.

    Args:
        s_s: `S^T S`, `[N, N]` float64 (pairs oldest first).
        s_y: `S^T Y`, `[N, N]` (`[i, j] = Δw_i^T Δg_j`).
        s_v: `S^T v`, `[N]`.
        y_v: `Y^T v`, `[N]`.

    Returns:
        σ, the coefficients `a` of the Δw's and `b` of the Δg's (`[N]` each); None where σ or the
        system is not finite (a zero Δw, a singular matrix).
    """
    sigma = float(s_y[-1, -1] / s_s[-1, -1])  # Δg_{t-1}^T Δw_{t-1} / |Δw_{t-1}|^2
    if not math.isfinite(sigma):
        return None
    lower = s_y.tril(-1)  # L
    matrix = torch.cat([torch.cat([-s_y.diag().diag(), lower.T], dim=1),
                        torch.cat([lower, sigma * s_s], dim=1)])  # [2N, 2N]
    rhs = torch.cat([y_v, sigma * s_v])  # [2N]
    try:
        p = torch.linalg.solve(matrix, rhs)  # [2N]
    except RuntimeError:  # torch.linalg.LinAlgError: singular
        return None
    if not bool(p.isfinite().all()):
        return None
    n = s_s.shape[0]
    return sigma, -sigma * p[n:], -p[:n]  # Ĥ v = σ v - Y p_Y - σ S p_S


def distances_to(rows: Tensor, point: Tensor) -> Tensor:
    """`|rows[i] - point|` for every row, `[n]` float64 on the CPU, in one pass by column chunks.

    Each chunk's difference is reduced by blocks of `NORM_BLOCK` columns (short float32 sums, one
    thread per output, so independent of the thread count) and the squares are summed in float64.
    """
    n, n_params = rows.shape
    budget = DISTANCE_CHUNK_BYTES if rows.device.type == "cpu" else DISTANCE_CHUNK_BYTES_GPU
    chunk = max(1, budget // (n * rows.element_size() * NORM_BLOCK)) * NORM_BLOCK  # columns, whole blocks
    total = torch.zeros(n, dtype=torch.float64, device=rows.device)
    for start in range(0, n_params, chunk):
        diff = rows[:, start:start + chunk] - point[start:start + chunk]  # [n, chunk]
        full = diff.shape[1] // NORM_BLOCK * NORM_BLOCK
        if full:
            blocks = diff[:, :full].reshape(n, -1, NORM_BLOCK)  # [n, blocks, NORM_BLOCK], a view
            total += torch.linalg.vector_norm(blocks, dim=2).double().square().sum(dim=1)
        total += diff[:, full:].double().square().sum(dim=1)  # the tail columns
    return total.sqrt().cpu()


def within_cluster_sums(points: Tensor, max_clusters: int) -> Tensor:
    """The least within-cluster sum of squares of 1..max_clusters clusters of each row's points.

    In one dimension optimal clusters are runs of the sorted points, so dynamic programming over the
    runs gives the exact optimum of k-means: `D_k[j] = min_i D_{k-1}[i - 1] + cost(i, j)`, with
    `cost(i, j)` the sum of squares of sorted points i..j around their mean (from prefix sums).

    Args:
        points: `[m, n]` float64, m independent sets of n points.
        max_clusters: The largest k, at most n.

    Returns:
        `W[r, k - 1]`, `[m, max_clusters]`.
    """
    m, n = points.shape
    x = points.sort(dim=1).values
    zero = torch.zeros(m, 1, dtype=torch.float64)
    c1 = torch.cat([zero, x.cumsum(1)], dim=1)  # [m, n + 1]
    c2 = torch.cat([zero, x.square().cumsum(1)], dim=1)
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    length = (j - i + 1).clamp_min(1).double()  # [n, n]
    seg_sum = c1[:, None, 1:] - c1[:, :-1, None]  # [m, n, n]: [r, i, j] = sum of x[r, i..j]
    seg_sq = c2[:, None, 1:] - c2[:, :-1, None]
    cost = (seg_sq - seg_sum.square() / length).clamp_min(0)
    cost = cost.masked_fill((i > j)[None], math.inf)  # [m, n, n], runs i..j
    best = cost[:, 0, :]  # [m, n]: D_1[j], one cluster over points 0..j
    sums = [best[:, -1]]
    for _ in range(1, max_clusters):
        before = torch.cat([torch.full((m, 1), math.inf, dtype=torch.float64), best[:, :-1]], dim=1)  # D_{k-1}[i - 1]
        best = (before[:, :, None] + cost).min(dim=1).values  # [m, n]
        sums.append(best[:, -1])
    return torch.stack(sums, dim=1)


def gap_statistic_clusters(scores: Tensor, draws: int, max_clusters: int, generator: torch.Generator) -> int:
    """The number of clusters the gap statistic picks for the scores (1: no attack).

    Args:
        scores: `[n]` float64.
        draws: B, uniform reference sets of n points on [0, 1].
        max_clusters: The largest k considered (capped at n - 1).
        generator: Draws the reference sets.
    """
    n = scores.numel()
    top = min(max_clusters, n - 1)
    if top < 2:
        return 1
    low, high = float(scores.min()), float(scores.max())
    if not high > low:  # identical scores: one cluster
        return 1
    scaled = (scores - low) / (high - low)  # [n], in [0, 1]
    reference = torch.rand(draws, n, generator=generator, dtype=torch.float64)  # [B, n]
    log_w = within_cluster_sums(torch.cat([scaled[None], reference]), top).clamp_min(_TINY).log()  # [B + 1, K]
    gap = log_w[1:].mean(dim=0) - log_w[0]  # [K]
    spread = log_w[1:].std(dim=0, unbiased=False) * math.sqrt(1 + 1 / draws)  # [K], s_k
    for k in range(1, top):
        if gap[k - 1] >= gap[k] - spread[k]:
            return k
    return top


def larger_cluster(scores: Tensor, restarts: int) -> Tensor:
    """2-means on the scores; the members of the cluster of the larger mean, bool `[n]`."""
    from sklearn.cluster import KMeans  # imported here: only some rules need scikit-learn at run time

    labels = KMeans(n_clusters=2, n_init=restarts, random_state=0).fit_predict(scores[:, None].numpy())
    labels = torch.from_numpy(labels).long()
    means = [float(scores[labels == c].mean()) if bool((labels == c).any()) else -math.inf for c in (0, 1)]
    return labels == (1 if means[1] > means[0] else 0)
