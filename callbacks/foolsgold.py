"""FoolsGold.

Paper: Fung, Yoon and Beschastnikh, "The Limitations of Federated Learning in Sybil Settings",
RAID 2020 (arXiv:1808.04866), Algorithm 1.

Sybils that push one poisoning objective send updates that look alike round after round, while
honest clients' histories differ. Each client's history is the sum of all the updates it has sent.
For the n clients of a round, with `cs` their histories' pairwise cosine similarities (the diagonal
excluded) and `v_i = max_j cs_ij`:

1. pardoning: `cs_ij *= v_i / v_j` whenever `v_j > v_i`, so an honest client that happens to
   resemble a sybil is not punished for the sybil's similarity;
2. `α_i = 1 - max_j cs_ij`, clipped to [0, 1], then divided by its maximum;
3. the logit: `α_i = κ (ln(α_i / (1 - α_i)) + 0.5)` (with α = 1 taken as 0.99), clipped to [0, 1].

The round's step is the mean of the updates weighted by α_i times their example counts (the paper
scales each update by α_i; normalising by the weights' sum makes a round of equally trusted clients
FedAvg).

Bounded memory (deviation): a full history per client would take K × n_params floats (384 GB for
80,000 clients of a 1.2M-parameter model). Each update is instead kept as a seeded count sketch of
`sketch_size` buckets (every parameter adds its value, times a random sign, to one random bucket;
Charikar, Chen and Farach-Colton, ICALP 2002), which preserves inner products in expectation, so
the histories' cosines are estimated from K × sketch_size floats (330 MB for 80,000 clients at the
default 1,024; clients are stored only once seen). The sketch is linear, so the sketch of a
client's history is the sum of its updates' sketches. The histories are the aggregator's state,
saved in the checkpoint: a killed and resumed run continues bitwise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fl_lightning.aggregation import Aggregate, Aggregator, RoundContext
from fl_lightning.config import check_argument, check_int, check_positive
from fl_lightning.kernels import weighted_sum

_SKETCH_SEED = 0xF001


class FoolsGold(Aggregator):
    """FoolsGold: down-weights clients whose update histories resemble each other's (sybils).

    Args:
        sketch_size: Buckets of each client's count-sketched history (memory: clients seen × this).
        kappa: κ, the confidence parameter of the logit (the paper: 1).
    """

    def __init__(self, sketch_size: int = 1024, kappa: float = 1.0) -> None:
        check_argument(self, "sketch_size", check_int, sketch_size, minimum=2)
        check_argument(self, "kappa", check_positive, kappa)
        self.sketch_size, self.kappa = sketch_size, kappa
        self.client_ids = torch.zeros(0, dtype=torch.int64)   # [k], the clients seen, sorted
        self.histories = torch.zeros(0, sketch_size, dtype=torch.float64)  # [k, sketch_size]
        self._hash: tuple[Tensor, Tensor] | None = None
        self._context: RoundContext | None = None

    def begin_round(self, context: RoundContext) -> None:
        self._context = context

    def state_dict(self) -> dict[str, Tensor]:
        return {"client_ids": self.client_ids, "histories": self.histories}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.client_ids, self.histories = state["client_ids"], state["histories"]

    def sketch(self, deltas: Tensor) -> Tensor:
        """The count sketch of every update, `[n, sketch_size]` float64 (CPU)."""
        n_params = deltas.shape[1]
        if self._hash is None or self._hash[0].numel() != n_params:
            generator = torch.Generator().manual_seed(_SKETCH_SEED)
            buckets = torch.randint(self.sketch_size, (n_params,), generator=generator)  # [n_params]
            signs = torch.randint(2, (n_params,), generator=generator).float() * 2 - 1  # [n_params], ±1
            self._hash = buckets, signs
        buckets, signs = self._hash
        # One scatter-add of the signed updates into their buckets, in float32 (each bucket sums ~n_params /
        # sketch_size values; its rounding is far below what a cosine between histories can tell apart).
        signed = deltas.detach().cpu().float() * signs  # [n, n_params]
        out = torch.zeros(deltas.shape[0], self.sketch_size).index_add_(1, buckets, signed)
        return out.double()

    def aggregate(self, deltas: Tensor, weights: Tensor, generator: torch.Generator) -> Aggregate:
        if self._context is None:
            raise ValueError("FoolsGold needs the round's client ids: call begin_round before aggregate")
        ids = self._context.client_ids.cpu()
        histories = self.add_to_histories(ids, self.sketch(deltas))  # [n, sketch_size]
        alpha = foolsgold_weights(histories, self.kappa)  # [n]
        counts = weights.detach().to("cpu", torch.float64)
        mix = alpha * counts
        shares = mix / mix.sum() if mix.sum() > 0 else torch.zeros_like(mix)
        update = weighted_sum(deltas, shares.tolist(), deltas.dtype)
        return Aggregate(update=update, client_weights=shares.to(deltas.device, deltas.dtype), flagged=alpha == 0)

    def add_to_histories(self, ids: Tensor, sketches: Tensor) -> Tensor:
        """Adds this round's sketches to the clients' histories (new clients start at zero); their histories."""
        new = ids[~torch.isin(ids, self.client_ids)]
        if new.numel():
            merged = torch.cat([self.client_ids, new.unique()])
            order = merged.argsort()
            histories = torch.cat([self.histories, torch.zeros(new.unique().numel(), self.sketch_size,
                                                               dtype=torch.float64)])
            self.client_ids, self.histories = merged[order], histories[order]
        rows = torch.searchsorted(self.client_ids, ids)  # [n]
        self.histories.index_add_(0, rows, sketches)
        return self.histories[rows]


def foolsgold_weights(histories: Tensor, kappa: float = 1.0) -> Tensor:
    """FoolsGold's α of each client from its history, `[n]` in [0, 1] (Algorithm 1 of the paper).

    Args:
        histories: The round's clients' histories, `[n, d]`.
        kappa: κ of the logit.
    """
    n = histories.shape[0]
    if n < 2:
        return torch.ones(n, dtype=torch.float64)
    norms = histories.norm(dim=1).clamp_min(1e-30)
    cs = (histories @ histories.T) / (norms[:, None] * norms[None, :])  # [n, n]
    cs.fill_diagonal_(-math.inf)  # a client is not its own neighbour
    top = cs.max(dim=1).values  # [n], v_i
    cs.fill_diagonal_(0.0)
    pardon = top[:, None] < top[None, :]  # v_i < v_j: scale cs_ij by v_i / v_j
    cs = torch.where(pardon, cs * top[:, None] / top[None, :].clamp_min(1e-30), cs)
    cs.fill_diagonal_(-math.inf)
    alpha = (1.0 - cs.max(dim=1).values).clamp(0.0, 1.0)
    if float(alpha.max()) > 0:
        alpha = alpha / alpha.max()
    alpha = torch.where(alpha == 1.0, torch.full_like(alpha, 0.99), alpha)
    with torch.no_grad():
        logit = kappa * (torch.log(alpha / (1.0 - alpha)) + 0.5)  # -inf where alpha = 0
    return torch.nan_to_num(logit, neginf=0.0).clamp(0.0, 1.0)
