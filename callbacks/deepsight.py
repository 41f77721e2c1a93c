"""DeepSight.

Paper: Rieger, Nguyen, Miettinen and Sadeghi, "DeepSight: Mitigating Backdoor Attacks in Federated
Learning Through Deep Model Inspection", NDSS 2022 (arXiv:2201.00763), Algorithms 1 and 2.

Each round, with n local models `W_i = G + Δ_i` around the global model `G`, an output layer of P
neurons (weights `w_{k,j}`, biases `b_k`) and `N` random inputs `x_m` per seed:

1. Division differences (DDifs), per seed s and output class k: the mean ratio of the local model's
   predicted probability to the global model's,
   `DDif_{i,s,k} = (1/N) sum_m p(k | x_m; W_i) / p(k | x_m; G)`, over inputs drawn afresh for each seed.
2. Normalised update energies (NEUPs) of the output neurons: `ε_{i,k} = sum_j |Δw_{i,k,j}| + |Δb_{i,k}|`,
   then `c_{i,k} = ε_{i,k}^2 / sum_k' ε_{i,k'}^2` (they sum to 1).
3. Threshold exceedings: `TE_i = #{k : c_{i,k} >= ξ max_k c_{i,k}}`, `ξ = max(0.01, 1 / P)`. A backdoor
   toward one label moves few output neurons, so its update has few exceedings.
4. Classification boundary: model i is labelled suspicious when `TE_i <= median(TE) / 2` (the median
   of an even count is the mean of the two middle values).
5. Clustering (Algorithm 2): HDBSCAN clusters the models separately on the DDifs of each seed, on the
   NEUPs, and on the cosine distances `1 - cos(Δb_i, Δb_j)` of their output-layer bias updates. Each
   clustering gives distances `D_ij = 0` when i and j share a cluster, else 1 (a noise point is a
   cluster of its own); the DDif distances are averaged over the seeds, and the ensemble distance is
   the mean of the three (DDifs, NEUPs, cosines). HDBSCAN on the ensemble distance gives the final
   clusters, a noise point again a cluster of its own.
6. Poisoned-cluster identification: a cluster is accepted when the share of suspicious models in it is
   below τ = 1/3; the models of the other clusters are left out (a lone model: left out iff suspicious).
7. Clipping and averaging: `S = median_i |Δ_i|` over all n updates; each accepted update is scaled by
   `min(1, S / |Δ_i|)`, and the accepted updates are averaged without example weights.

Defaults: N = 20,000 random inputs per seed, three seeds, τ = 1/3 (the paper's τ; N and the seed
count as the public implementations, BackFed and FLPoison, set them). HDBSCAN is scikit-learn's,
with the smallest clusters it can form (`min_cluster_size = 2`, `min_samples = 1`) and a single
cluster allowed, the same for every clustering: rounds here have as few as 5 updates, where its
default (clusters of 5) would leave one cluster or none.

Deviations and choices:

- The random inputs come from `ServerModel.random_inputs` with the round's generator (seeded by run
  seed and round), drawn seed after seed: uniform pixels for images, as the paper's random images. The
  paper defines DDifs for images only; for the text tasks the inputs are uniformly random token ids
  (sequences of the test inputs' length). Those are gibberish sentences, as noise images are
  meaningless pictures, so the probes play the same part, but the paper never evaluated them: how
  well DDifs separate models there is untested. A model with one output logit (Sentiment140) gets
  the two class probabilities `sigmoid(-z), sigmoid(z)`; its NEUPs are the single value 1, so no model
  is labelled suspicious there and DeepSight reduces to clustering plus clipping. Next-word models
  (`[B, T, V]` outputs) average the ratios over the positions too.
- The global model's probability in the ratio is floored at 1e-30 (BackFed adds 1e-30 to it):
  confident models on noise inputs give probabilities that underflow, and the ratio would be infinite.
  Ratios are taken in log space, `exp(log p_local - max(log p_global, log 1e-30))`, in float64.
- Threshold exceedings count NEUPs at the threshold too (`>=`, as BackFed): it changes nothing but
  the one-neuron case, where the threshold is the maximum itself.
- An update that leaves the output layer unchanged gets uniform NEUPs (no neuron stands out).
- Cosine distances use the output layer's bias updates (Algorithm 2), its weight updates when the
  layer has no bias.
- When no cluster is accepted the round's update is zero: the global model stays as it is.
- Buffers (BatchNorm statistics) are not part of the updates: every model is evaluated with the
  task's current buffers.

Cost: `num_seeds * N * (n + 1)` forward passes a round (the global model once per seed), and little
else: the rest is a pass over the output layer and `num_seeds + 3` HDBSCAN runs on n points. With
the defaults and 30 clients that is 1.86M forward passes; for the EMNIST LeNet (1.2M parameters) one
shared CPU core (AMD EPYC) did about 560 a second, so about 56 minutes a round; a GPU is far faster.
On CPUs pass a smaller `num_samples` (`--aggregator.num_samples 1000`: about three minutes). Inputs are drawn and
evaluated in chunks (`INPUT_BUDGET`, `OUTPUT_BUDGET`), so memory stays bounded for ImageNet inputs
and vocabulary-wide outputs. Left-out updates are reported as `flagged` (the detection metrics).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fl_lightning.aggregation import Aggregate, Aggregator, RoundContext
from fl_lightning.callbacks.flame import cosine_distances
from fl_lightning.config import ComponentError, check_argument, check_int
from fl_lightning.kernels import row_norms, weighted_sum

if TYPE_CHECKING:
    from fl_lightning.server import ServerModel

THRESHOLD_FLOOR = 0.01
"""ξ = max(THRESHOLD_FLOOR, 1 / P): the paper's threshold factor of the NEUPs."""
PROBABILITY_FLOOR = 1e-30
"""The global model's probability is floored here in the DDif ratio."""
INPUT_BUDGET = 1 << 26
"""Most input elements (all rows of a chunk) drawn at once."""
OUTPUT_BUDGET = 1 << 22
"""Most output elements (rows times outputs per row) of a chunk."""


class DeepSight(Aggregator):
    """DeepSight: clusters of DDifs, NEUPs and bias cosines; clusters rich in low-TE models left out; median clipping.

    Args:
        num_samples: N, random inputs per seed for the DDifs (20,000). The cost of a round grows with it:
            fewer make the DDifs noisier but CPU runs affordable.
        num_seeds: Seeds, i.e. independent sets of random inputs, each giving its own DDifs (3).
        tau: τ, a cluster is accepted while its share of suspicious models is below it (1/3).
    """

    def __init__(self, num_samples: int = 20_000, num_seeds: int = 3, tau: float = 1 / 3) -> None:
        check_argument(self, "num_samples", check_int, num_samples, minimum=1)
        check_argument(self, "num_seeds", check_int, num_seeds, minimum=1)
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 < tau <= 1:
            raise ComponentError("DeepSight", "tau", f"DeepSight tau must be in (0, 1] (a share of a cluster), "
                                                     f"got {tau!r}")
        self.num_samples, self.num_seeds, self.tau = num_samples, num_seeds, tau
        self._context: RoundContext | None = None

    def begin_round(self, context: RoundContext) -> None:
        self._context = context

    def aggregate(self, deltas: Tensor, weights: Tensor, generator: torch.Generator) -> Aggregate:
        context = self._context
        if context is None or context.server is None:
            raise ValueError("DeepSight evaluates the local models on random inputs: it needs the task's model "
                             "(RoundContext.server), passed through begin_round before aggregate")
        server, global_params = context.server, context.global_params
        weight, bias, num_outputs = server.output_layer()
        neups = normalised_update_energies(deltas, weight, bias, num_outputs)  # [n, P]
        suspicious = classification_labels(threshold_exceedings(neups))  # bool [n]
        ddifs = division_differences(server, global_params, deltas, self.num_samples, self.num_seeds,
                                     generator)  # [seeds, n, classes]
        bias_updates = deltas[:, bias if bias is not None else weight].double().cpu()  # [n, P] (or [n, P * fan_in])
        gram = bias_updates @ bias_updates.T  # [n, n]
        cosines = cosine_distances(gram, gram.diagonal().clamp_min(0).sqrt())  # [n, n]
        clusters = ensemble_clusters(ddifs, neups, cosines)  # [n]
        accepted = accepted_clusters(clusters, suspicious, self.tau)  # bool [n]

        norms = row_norms(deltas).cpu().double()  # [n], e_i
        bound = median(norms)  # S
        scale = torch.where(norms > bound, bound / norms.clamp_min(1e-30), torch.ones_like(norms))  # min(1, S/e)
        count = int(accepted.sum())
        coefficients = torch.where(accepted, scale / max(count, 1), torch.zeros_like(scale))  # [n]
        update = weighted_sum(deltas, coefficients.tolist(), deltas.dtype)
        client_weights = accepted.double() / max(count, 1)
        return Aggregate(update=update, client_weights=client_weights.to(deltas.device, deltas.dtype),
                         flagged=~accepted)


def median(values: Tensor) -> float:
    """The median of `[n]` values; for an even n the mean of the two middle ones."""
    ordered, n = values.double().sort().values, values.shape[0]
    return float(ordered[n // 2]) if n % 2 else float(ordered[n // 2 - 1: n // 2 + 1].mean())


def normalised_update_energies(deltas: Tensor, weight: slice, bias: slice | None, num_outputs: int) -> Tensor:
    """NEUPs `c_{i,k}` of the output neurons, `[n, P]` float64 on the CPU, each row summing to 1.

    Args:
        deltas: Client updates `[n, n_params]`.
        weight: The output layer's weight `[P, fan_in]` in the flat vector.
        bias: Its bias `[P]`, or None.
        num_outputs: P.
    """
    n = deltas.shape[0]
    energy = deltas[:, weight].reshape(n, num_outputs, -1).abs().sum(dim=2, dtype=torch.float64)  # [n, P]
    if bias is not None:
        energy += deltas[:, bias].abs().double()  # sum_j |Δw_kj| + |Δb_k|
    squared = energy.cpu().square()  # [n, P]
    total = squared.sum(dim=1, keepdim=True)  # [n, 1]
    uniform = torch.full_like(squared, 1.0 / num_outputs)
    return torch.where(total > 0, squared / total.clamp_min(1e-300), uniform)


def threshold_exceedings(neups: Tensor) -> Tensor:
    """`TE_i`: how many NEUPs reach `max(0.01, 1 / P)` times the model's largest, `[n]` int64."""
    factor = max(THRESHOLD_FLOOR, 1.0 / neups.shape[1])
    return (neups >= factor * neups.max(dim=1, keepdim=True).values).sum(dim=1)


def classification_labels(exceedings: Tensor) -> Tensor:
    """Suspicious (True) when `TE_i <= median(TE) / 2`, bool `[n]`."""
    return exceedings.double() <= median(exceedings) / 2


@torch.no_grad()
def division_differences(server: ServerModel, global_params: Tensor, deltas: Tensor, num_samples: int,
                         num_seeds: int, generator: torch.Generator) -> Tensor:
    """DDifs `(1/N) sum_m p(k | x_m; G + Δ_i) / p(k | x_m; G)`, `[seeds, n, classes]` float64 on the CPU.

    Each seed draws `num_samples` inputs from `generator` (`ServerModel.random_inputs`), chunk by
    chunk; every chunk is evaluated by the global model once and by each local model.
    """
    n = deltas.shape[0]
    like = server.probe_like[:1]
    per_row_out = server.logits(global_params, like)[0].numel()  # outputs per input
    per_row_in = max(like[0].numel(), 1)
    chunk = max(1, min(num_samples, OUTPUT_BUDGET // max(per_row_out, 1), INPUT_BUDGET // per_row_in))
    local = torch.empty_like(global_params)  # one local model at a time, [n_params]
    sums: list[Tensor] = []
    for _ in range(num_seeds):
        total = None  # [n, classes], float64
        positions = 0  # predictions per class summed so far (inputs, times positions for sequence outputs)
        for start in range(0, num_samples, chunk):
            inputs = server.random_inputs(min(chunk, num_samples - start), generator)  # [rows, ...]
            reference = class_log_probs(server.logits(global_params, inputs)).clamp_min(math.log(PROBABILITY_FLOOR))
            if total is None:
                total = torch.zeros(n, reference.shape[1], dtype=torch.float64)
            for i in range(n):
                torch.add(global_params, deltas[i].to(global_params.device), out=local)
                ratio = (class_log_probs(server.logits(local, inputs)) - reference).exp()  # [rows * T, classes]
                total[i] += ratio.sum(dim=0).cpu()
            positions += reference.shape[0]
        sums.append(total / positions)
    return torch.stack(sums)


def class_log_probs(logits: Tensor) -> Tensor:
    """Log-probabilities of the classes, float64 `[rows, classes]`: softmax over the last dim (positions of
    sequence outputs `[B, T, V]` become rows); one logit `[B]` is binary, `(log σ(-z), log σ(z))`."""
    logits = logits.double()
    if logits.ndim == 1:
        return torch.stack([F.logsigmoid(-logits), F.logsigmoid(logits)], dim=1)  # [B, 2]
    return F.log_softmax(logits.reshape(-1, logits.shape[-1]), dim=1)


def hdbscan_labels(points: Tensor, precomputed: bool = False) -> np.ndarray:
    """HDBSCAN's clusters of `points` (`[n, d]` features, or `[n, n]` distances), `[n]` int, -1 for noise.

    Under three points there is nothing to cluster: all are noise (each its own cluster).
    """
    from sklearn.cluster import HDBSCAN  # imported here: only the clustering rules need scikit-learn at run time

    n = points.shape[0]
    if n < 3:
        return np.full(n, -1)
    return HDBSCAN(metric="precomputed" if precomputed else "euclidean", min_cluster_size=2, min_samples=1,
                   allow_single_cluster=True, copy=True).fit_predict(points.double().numpy())


def cluster_distances(labels: np.ndarray) -> Tensor:
    """`D_ij = 0` when i and j share a cluster, else 1 (noise points are apart from all), `[n, n]` float64."""
    labels = torch.from_numpy(np.asarray(labels))
    same = (labels[:, None] == labels[None, :]) & (labels[:, None] >= 0)
    distances = (~same).double()
    distances.fill_diagonal_(0.0)
    return distances


def ensemble_clusters(ddifs: Tensor, neups: Tensor, cosines: Tensor) -> np.ndarray:
    """Algorithm 2: the final clusters `[n]` (-1: noise) from the DDif (per seed), NEUP and cosine clusterings.

    Args:
        ddifs: `[seeds, n, classes]`.
        neups: `[n, P]`.
        cosines: Pairwise cosine distances of the output-layer bias updates, `[n, n]`.
    """
    ddif_distances = torch.stack([cluster_distances(hdbscan_labels(seed)) for seed in ddifs]).mean(dim=0)  # [n, n]
    neup_distances = cluster_distances(hdbscan_labels(neups))  # [n, n]
    cosine_clusters = cluster_distances(hdbscan_labels(cosines, precomputed=True))  # [n, n]
    merged = (ddif_distances + neup_distances + cosine_clusters) / 3  # [n, n]
    return hdbscan_labels(merged, precomputed=True)


def accepted_clusters(clusters: np.ndarray, suspicious: Tensor, tau: float) -> Tensor:
    """The models of clusters whose share of suspicious models is below `tau`, bool `[n]`; a noise point is
    a cluster of its own (accepted iff not suspicious)."""
    clusters = torch.from_numpy(np.asarray(clusters)).long()
    singletons = torch.arange(clusters.shape[0]) + int(clusters.max()) + 1 if clusters.numel() else clusters
    ids = torch.where(clusters >= 0, clusters, singletons)  # noise points get ids of their own
    count = torch.bincount(ids).double()  # [clusters]
    share = torch.bincount(ids, weights=suspicious.double()) / count.clamp_min(1)  # [clusters]
    return share[ids] < tau
