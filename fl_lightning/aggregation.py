"""Server-side aggregation: the `Aggregator` contract and FedAvg.

Every defense of the paper is an aggregator over the stacked flat client updates
(`[n_clients, n_params]`, one row per client, on the device): robust rules replace FedAvg, and
norm clipping / weak DP wrap an inner aggregator. One config key, `aggregator`, spans them all.

FedAvg: McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017 (arXiv:1602.05629).

The sums themselves are in `fl_lightning.kernels`; rules check their constructor arguments with
`fl_lightning.config.check_argument`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fl_lightning.config import ComponentError
from fl_lightning.kernels import weighted_sum

if TYPE_CHECKING:
    from fl_lightning.config import FLArgs
    from fl_lightning.server import ServerModel


@dataclass(frozen=True)
class Aggregate:
    """What an aggregator returns.

    Attributes:
        update: The step to add to the global model, `[n_params]`.
        client_weights: The weight each client effectively got, `[n_clients]`, summing to 1 where
            the rule is a weighted mean (one-hot for Krum, the selection for Multi-Krum, the
            Weiszfeld weights for RFA); `None` for coordinate-wise rules that have no such weights.
        noise: Added to the new global model after the server step, not scaled by the server step
            size (weak DP's Gaussian noise), `[n_params]`; `None` for none.
        flagged: The updates the rule excluded or marked as suspicious, bool `[n_clients]`; `None`:
            those with zero `client_weights`, if any (a rule that gives every update some weight,
            such as FedAvg or RFA, excludes none and reports no detection). The detection metrics
            (`detection_tpr`, `detection_fpr`) compare it with the attackers' slots.
    """

    update: Tensor
    client_weights: Tensor | None
    noise: Tensor | None = None
    flagged: Tensor | None = None

    def flagged_mask(self) -> Tensor | None:
        """`flagged`, else the zero-weight updates when there are any, else None (the rule excluded none)."""
        if self.flagged is not None:
            return self.flagged.cpu()
        if self.client_weights is None or not bool((self.client_weights == 0).any()):
            return None
        return self.client_weights.cpu() == 0

    def apply_(self, global_params: Tensor, server_lr: float) -> None:
        """`global_params += server_lr * update`, then `+= noise`, in place."""
        global_params.add_(self.update, alpha=server_lr)
        if self.noise is not None:
            global_params.add_(self.noise)


@dataclass(frozen=True)
class RoundContext:
    """What a rule may know of the round beyond the updates; the simple rules never look.

    Attributes:
        round_idx: The round.
        client_ids: The clients behind the rows of `deltas`, `[n]` int64 on the CPU.
        global_params: The round's global model, `[n_params]` (read-only).
        server: The task's model and the server's own examples, for rules that train or evaluate
            (FLTrust, DeepSight); None where no task is at hand (unit tests of the simple rules).
    """

    round_idx: int
    client_ids: Tensor
    global_params: Tensor
    server: ServerModel | None = None


class Aggregator(ABC):
    """Turns the round's client updates into one global update.

    Subclasses implement `aggregate`. They must be pure in their inputs (and the generator they are
    handed): every rank calls them on identical `RoundUpdates`, and a resumed run calls them again.
    Store each constructor argument under an attribute of the same name: that is how the resolved
    configuration of a run is written back (`fl_lightning.config.component_config`).

    Rules that need more override the optional parts, which default to nothing: `begin_round` receives
    the round's `RoundContext` before `aggregate` (client ids, global model), and `state_dict` /
    `load_state_dict` carry state across rounds (tensors, saved in the checkpoint, so a resumed run
    continues bitwise). State must change only inside `aggregate`, identically on every rank. A rule
    that trains on server-held data sets `server_examples`: that many test rows are set aside for it
    (`RoundContext.server.root_inputs`) and left out of the main-task evaluation.
    """

    server_examples: int = 0

    def begin_round(self, context: RoundContext) -> None:
        """Called with the round's context just before `aggregate` (the default ignores it)."""
        return  # most rules need nothing beyond the updates

    def state_dict(self) -> dict[str, Tensor]:
        """State kept across rounds, as named tensors (the default: none)."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restores `state_dict` (from a checkpoint)."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, but the checkpoint holds {sorted(state)}")

    @abstractmethod
    def aggregate(self, deltas: Tensor, weights: Tensor, generator: torch.Generator) -> Aggregate:
        """Aggregate one round.

        Args:
            deltas: Client updates (local minus global model), `[n_clients, n_params]`.
            weights: Example counts of the clients, `[n_clients]`, float.
            generator: Seeded by (seed, round) for rules that draw random numbers (weak DP); a CPU
                generator, so draws do not depend on the device.

        Returns:
            The aggregate update and the weight each client got.
        """

    def check_run(self, fl: FLArgs) -> None:
        """Raises `ConfigError` if the rule cannot aggregate rounds of these settings (checked before launch).

        E.g. Multi-Krum needs more than `2 f + 2` updates per round; `fl.clients_per_round` is that
        count when no update is rejected.
        """
        return  # most rules run with any number of updates

    def __call__(self, deltas: Tensor, weights: Tensor, generator: torch.Generator) -> Aggregate:
        if deltas.ndim != 2 or weights.shape != (deltas.shape[0],):
            raise ValueError(f"expected deltas [n, n_params] and weights [n], got {tuple(deltas.shape)} and "
                             f"{tuple(weights.shape)}")
        return self.aggregate(deltas, weights.to(deltas.dtype), generator)


class FedAvg(Aggregator):
    """Example-count weighted mean of the client updates (the paper's no-defense baseline)."""

    def aggregate(self, deltas: Tensor, weights: Tensor, generator: torch.Generator) -> Aggregate:
        client_weights = weights / weights.sum()  # [n]
        return Aggregate(update=weighted_sum(deltas, client_weights), client_weights=client_weights)


class Wrapper(Aggregator):
    """A rule around an inner aggregator (norm clipping, weak DP, CRFL): the inner rule's checks, round
    context and state pass through it.

    Args:
        inner: The aggregator the wrapper runs; None means FedAvg (stored resolved, so the saved config
            says FedAvg).
    """

    def __init__(self, inner: Aggregator | None = None) -> None:
        if inner is not None and not isinstance(inner, Aggregator):
            raise ComponentError(type(self).__name__, "inner", f"{type(self).__name__} inner must be an Aggregator "
                                                                f"or None, got {inner!r}")
        self.inner = inner if inner is not None else FedAvg()

    def check_run(self, fl: FLArgs) -> None:
        self.inner.check_run(fl)

    def begin_round(self, context: RoundContext) -> None:
        self.inner.begin_round(context)

    def state_dict(self) -> dict[str, Tensor]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.inner.load_state_dict(state)
