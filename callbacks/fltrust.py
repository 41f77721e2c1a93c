"""FLTrust.

Paper: Cao, Fang, Liu and Gong, "FLTrust: Byzantine-robust Federated Learning via Trust
Bootstrapping", NDSS 2021 (arXiv:2012.13995), Algorithm 1-2.

The server holds a small clean "root" dataset and, each round, computes its own update `g_0` on
it from the global model, as a client would. For the n client updates `g_i`:

1. trust scores: `TS_i = ReLU(cos(g_i, g_0))`, so an update pointing away from the server's is
   given no weight;
2. norm rescaling: `ḡ_i = (|g_0| / |g_i|) g_i`, so no update weighs more by being larger;
3. the step: `g = Σ TS_i ḡ_i / Σ TS_j` (zero when every score is zero).

Settings (the paper's defaults): a root set of 100 examples; the server trains with the clients'
own settings (learning rate of the round, local epochs, batch size, momentum), since the paper's
server update is one more client's. The root set is `root_size` test rows that no client holds
(`fl_lightning.server.split_test_rows`; the paper draws it from the clients' distribution, not
their data), left out of every main-task evaluation of the run, so no reported accuracy is
measured on examples the server trained on. The server's randomness (batch order, dropout) is
seeded from the round's generator, so every rank computes the same `g_0`. Updates with zero trust are `flagged` (the
detection metrics).

Deviation: the paper's updates are gradients and the server subtracts them; here they are model
differences and the server adds them, the same rule.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fl_lightning.aggregation import Aggregate, Aggregator, RoundContext
from fl_lightning.config import check_argument, check_int
from fl_lightning.kernels import row_dots, row_norms, weighted_sum


class FLTrust(Aggregator):
    """FLTrust: ReLU-cosine trust in the server's own update on a root set, and norm rescaling to it.

    Args:
        root_size: Examples in the server's root set (the paper: 100), drawn once from the test rows.
    """

    def __init__(self, root_size: int = 100) -> None:
        check_argument(self, "root_size", check_int, root_size, minimum=1)
        self.root_size = root_size
        self._context: RoundContext | None = None

    @property
    def server_examples(self) -> int:  # the contract's hook: the engine sets this many test rows aside
        return self.root_size

    def begin_round(self, context: RoundContext) -> None:
        self._context = context

    def aggregate(self, deltas: Tensor, weights: Tensor, generator: torch.Generator) -> Aggregate:
        context = self._context
        if context is None or context.server is None:
            raise ValueError("FLTrust trains on the server's root set: it runs inside `fit`, which hands it the task")
        seed = int(torch.randint(0, 2**62, (), generator=generator))  # from (run seed, round): the same on every rank
        server_update = context.server.train(context.global_params, seed).to(deltas.dtype)  # g_0, [n_params]
        return trust_weighted(deltas, server_update)


def trust_weighted(deltas: Tensor, server_update: Tensor) -> Aggregate:
    """FLTrust's step from the client updates `[n, n_params]` and the server's update `g_0 [n_params]`."""
    norms = row_norms(deltas).double()  # [n], |g_i|
    server_norm = float(row_norms(server_update[None]).double())  # |g_0|
    cosines = row_dots(deltas, server_update) / (norms * server_norm).clamp_min(1e-30)  # [n]
    trust = cosines.clamp_min(0.0)  # [n], TS_i
    total = float(trust.sum())
    if total == 0.0:  # every update points away from the server's: no step this round
        zeros = torch.zeros(deltas.shape[0], dtype=deltas.dtype, device=deltas.device)
        return Aggregate(update=torch.zeros_like(server_update), client_weights=zeros,
                         flagged=torch.ones(deltas.shape[0], dtype=torch.bool))
    coefficients = trust * server_norm / norms.clamp_min(1e-30) / total  # [n]: TS_i |g_0| / (|g_i| Σ TS)
    update = weighted_sum(deltas, coefficients.tolist(), deltas.dtype)
    return Aggregate(update=update, client_weights=(trust / total).to(deltas.device, deltas.dtype),
                     flagged=(trust == 0).cpu())
