"""The values that travel through a round: the plan, a client's training context, its update, the gathered updates.

Shared by the orchestrator, the clients, the gather, the metrics and the callbacks; nothing here
computes anything beyond selecting rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from fl_lightning.task import Task


@dataclass
class RoundPlan:
    """The round's participants, in slot order; `on_round_start` hooks may mark adversaries.

    Attributes:
        round_idx: The round (1-based).
        client_ids: Client id of every slot.
        is_adversary: Whether each slot is played by an attacker (decided by attack callbacks from
            (seed, round) only, so every rank agrees).
    """

    round_idx: int
    client_ids: list[int]
    is_adversary: list[bool]


@dataclass
class LocalTraining:
    """Mutable context of one client's local run; hooks change its fields.

    Attributes:
        round_idx: The round.
        slot: Position of the client in the round's list.
        client_id: The client.
        is_adversary: Whether an attacker plays this slot.
        model: The rank's one model (the task), loaded with the global parameters.
        global_params: The round's global model, flat `[n_params]` (read-only).
        inputs: The client's training inputs (hooks may swap in a poisoned set).
        targets: Their targets.
        lr: Learning rate of this round (decay applied).
        lr_scale: The round's decay factor `lr_decay ** (round_idx - 1)` (attacks decay their own lr and eps by it).
        epochs: Local epochs.
        batch_size: Mini-batch size.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        grad_clip_norm: Clip the gradient norm to this before each step (0: off).
        seed: Seed of this client's randomness in this round, from (seed, round, client, slot).
        generator: CPU generator seeded with `seed`, for the batch order.
        optimizer: Built after `on_client_start` from the fields above unless a hook set one.
        num_examples: Example count reported to the server (defaults to the data size).
        step_hooks: Whether `on_after_optimizer_step` fires after each step: set when a callback
            overrides it (the call inspects signatures, so it is skipped when nobody listens); side
            training of an attack turns it off.
        delta_out: The client's row of the round buffer, `[n_params]`: its update is written there
            (local minus global, in place), so no per-client tensor is allocated; None (tests,
            side training): a new tensor.
    """

    round_idx: int
    slot: int
    client_id: int
    is_adversary: bool
    model: Task
    global_params: Tensor
    inputs: Tensor
    targets: Tensor
    lr: float
    lr_scale: float
    epochs: int
    batch_size: int
    momentum: float
    weight_decay: float
    grad_clip_norm: float
    seed: int
    generator: torch.Generator
    optimizer: torch.optim.Optimizer | None = None
    num_examples: int | None = None
    step_hooks: bool = False
    delta_out: Tensor | None = None


@dataclass
class ClientUpdate:
    """What one client sends.

    Attributes:
        slot: Position in the round's client list.
        client_id: The client.
        delta: Local minus global parameters, `[n_params]`: in a run, a view of the client's row of
            the round buffer (`LocalTraining.delta_out`), so `on_client_end` changes it in place.
        num_examples: Example count (the FedAvg weight).
        loss: Mean training loss over the local steps.
        is_adversary: Ground truth for metrics only; aggregators never see it.
        stats: Extra per-client scalars for logging (e.g. an attacker's norm before scaling).
    """

    slot: int
    client_id: int
    delta: Tensor
    num_examples: int
    loss: float
    is_adversary: bool
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class RoundUpdates:
    """The round's updates stacked in slot order, identical on every rank after the gather.

    `deltas` is normally the round buffer itself (`distributed.UpdateGatherer`), reused next round:
    it is valid until the round ends, and on several CPU processes of one machine it is memory
    shared by all ranks, so it is read-only for aggregators (which are pure) and callbacks alike,
    except `on_before_aggregate`, which then gets a private copy.

    Attributes:
        client_ids: `[n]` int64.
        deltas: `[n, n_params]`.
        num_examples: `[n]` float (example counts).
        losses: `[n]` float.
        is_adversary: `[n]` bool; feeds metrics only, never an aggregator.
        stats: One dict of extra scalars per client.
    """

    client_ids: Tensor
    deltas: Tensor
    num_examples: Tensor
    losses: Tensor
    is_adversary: Tensor
    stats: list[dict[str, float]]

    def select(self, keep: Tensor) -> RoundUpdates:
        """The rows where `keep` (`[n]` bool) is true."""
        rows = keep.nonzero().flatten().tolist()
        return RoundUpdates(self.client_ids[keep], self.deltas[keep], self.num_examples[keep], self.losses[keep],
                            self.is_adversary[keep], [self.stats[i] for i in rows])
