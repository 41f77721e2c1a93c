"""Local differential privacy: every honest client clips and noises its own update before sending it.

Paper: Naseri, Hayes and De Cristofaro, "Local and Central Differential Privacy for Robustness and
Privacy in Federated Learning", NDSS 2022 (arXiv:2009.03561): noise added on the client side (local
DP) bounds what any single update can carry, backdoors included, at a cost in accuracy; weak DP
(`WeakDP`, Sun et al. 2019, the paper's defense) adds it on the server instead.

Each honest client's update Δ becomes `Δ · min(1, M / |Δ|) + N(0, σ² I)` before it leaves the
client, where M is `norm_bound` and σ is `stddev`. The defaults are the server-side weak DP of Wang
et al.'s EMNIST runs (M = 1.5, σ = 0.025), so the two placements of the same noise can be compared.
Attackers do not follow the protocol: their updates are left as they are. The noise comes from a
generator seeded by the client's own seed (seed, round, client, slot), so a run is the same on any
number of processes and after a resume.
"""

from __future__ import annotations

import torch

from fl_lightning.config import check_argument, check_non_negative, check_positive
from fl_lightning.hooks import FLCallback
from fl_lightning.sampling import derive_seed
from fl_lightning.types import ClientUpdate, LocalTraining

_NOISE = 0x1D9


class LocalDP(FLCallback):
    """Clips every honest client's update to `norm_bound` and adds N(0, stddev²) noise per coordinate, client-side.

    Args:
        norm_bound: M, the L2 norm each honest update is clipped to.
        stddev: σ of the Gaussian noise added to each coordinate of each honest update.
    """

    def __init__(self, norm_bound: float = 1.5, stddev: float = 0.025) -> None:
        check_argument(self, "norm_bound", check_positive, norm_bound)
        check_argument(self, "stddev", check_non_negative, stddev)
        self.norm_bound, self.stddev = norm_bound, stddev

    def on_client_end(self, ctx: LocalTraining, update: ClientUpdate) -> None:
        if ctx.is_adversary:
            return
        delta = update.delta  # [n_params], the client's row of the round buffer: changed in place
        norm = float(delta.norm())
        if norm > self.norm_bound:
            delta.mul_(self.norm_bound / norm)
        if self.stddev > 0:
            generator = torch.Generator().manual_seed(derive_seed(_NOISE, ctx.seed))
            noise = torch.randn(delta.shape, generator=generator, dtype=delta.dtype)  # drawn on the CPU
            delta.add_(noise.to(delta.device), alpha=self.stddev)
