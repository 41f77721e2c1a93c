"""One client's local training, and the values that travel between client and server.

`train_client` runs a client's local epochs through the task's `training_step` on the rank's one
model (reloaded from the flat global vector, never deep-copied), with a fresh SGD optimizer, and
returns its update. Attacks hook in through `on_client_start`, `on_after_optimizer_step` and
`on_client_end` (see `hooks.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from fl_lightning.task import iterate_batches

if TYPE_CHECKING:
    from lightning.fabric import Fabric

    from fl_lightning.config import ClientArgs
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


@dataclass
class ClientUpdate:
    """What one client sends.

    Attributes:
        slot: Position in the round's client list.
        client_id: The client.
        delta: Local minus global parameters, `[n_params]`.
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


def flat_params(module: nn.Module) -> Tensor:
    """All trainable parameters as one flat vector `[n_params]` (a copy)."""
    return torch.cat([p.detach().reshape(-1) for p in module.parameters() if p.requires_grad])


@torch.no_grad()
def load_flat_params_(module: nn.Module, flat: Tensor) -> None:
    """Copies a flat vector into the module's trainable parameters, in place."""
    params = [p for p in module.parameters() if p.requires_grad]
    chunks = torch.split(flat, [p.numel() for p in params])
    torch._foreach_copy_(params, [c.view_as(p) for c, p in zip(chunks, params)])


def client_lr(client: ClientArgs, round_idx: int) -> float:
    """The reference's per-round decay: `lr * lr_decay ** (round_idx - 1)`."""
    return client.lr * lr_scale(client, round_idx)


def lr_scale(client: ClientArgs, round_idx: int) -> float:
    """The decay factor of a round, `lr_decay ** (round_idx - 1)`."""
    return client.lr_decay ** (round_idx - 1)


def train_client(fabric: Fabric, task: Task, ctx: LocalTraining, step_hooks: bool) -> ClientUpdate:
    """Trains one client from the global model and returns its update.

    Args:
        fabric: The run's Fabric (hooks go through `fabric.call`; autocast for mixed precision).
        task: The task, whose model is the rank's one model.
        ctx: The client's context; `on_client_start` may change it.
        step_hooks: Whether any callback overrides `on_after_optimizer_step` (the call costs a
            signature inspection per step, so it is skipped when nobody listens).
    """
    start_client(fabric, task, ctx)
    return finish_client(fabric, task, ctx, step_hooks)


def start_client(fabric: Fabric, task: Task, ctx: LocalTraining) -> None:
    """Seeds the client's randomness, loads the global model and calls `on_client_start`.

    The batched trainer (`batched.py`) shares this start, so hooks see the same state in both modes.
    """
    # Dropout, augmentation and any attacker draws use torch's global generator: seeding it per
    # client (not per process) is what makes results independent of the number of processes.
    torch.manual_seed(ctx.seed)
    load_flat_params_(task, ctx.global_params)
    fabric.call("on_client_start", ctx=ctx)


def finish_client(fabric: Fabric, task: Task, ctx: LocalTraining, step_hooks: bool) -> ClientUpdate:
    """The rest of `train_client` after `start_client`: local epochs, the update, `on_client_end`."""
    if ctx.optimizer is None:
        ctx.optimizer = torch.optim.SGD([p for p in task.parameters() if p.requires_grad], lr=ctx.lr,
                                        momentum=ctx.momentum, weight_decay=ctx.weight_decay)
    mean_loss = run_local_epochs(fabric, task, ctx, step_hooks)
    update = ClientUpdate(
        slot=ctx.slot, client_id=ctx.client_id, delta=flat_params(task) - ctx.global_params,
        num_examples=ctx.num_examples if ctx.num_examples is not None else int(ctx.inputs.shape[0]),
        loss=mean_loss, is_adversary=ctx.is_adversary,
    )
    fabric.call("on_client_end", ctx=ctx, update=update)
    return update


def run_local_epochs(fabric: Fabric, task: Task, ctx: LocalTraining, step_hooks: bool) -> float:
    """`ctx.epochs` epochs of `ctx.optimizer` steps on `ctx`'s data; returns the mean loss.

    No client hooks fire here except the per-step one (when `step_hooks`), so attacks can reuse it
    for side training (the prox attack's estimate of the honest model).
    """
    params = [p for p in task.parameters() if p.requires_grad]
    task.train()
    loss_sum = torch.zeros((), device=ctx.global_params.device)
    num_steps = 0
    for _ in range(ctx.epochs):
        batches = iterate_batches(ctx.inputs, ctx.targets, ctx.batch_size, ctx.generator, task.drop_last)
        for batch_idx, batch in enumerate(batches):
            ctx.optimizer.zero_grad(set_to_none=True)
            with fabric.autocast():
                loss = task.training_step(batch, batch_idx)
            loss.backward()
            if ctx.grad_clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, ctx.grad_clip_norm)
            ctx.optimizer.step()
            if step_hooks:
                fabric.call("on_after_optimizer_step", ctx=ctx, batch_idx=batch_idx)
            loss_sum += loss.detach().float()
            num_steps += 1
    return float(loss_sum) / max(num_steps, 1)


def num_batches(num_examples: int, batch_size: int, drop_last: bool) -> int:
    """Mini-batches per epoch, as `iterate_batches` yields them."""
    return num_examples // batch_size if drop_last else -(-num_examples // batch_size)


@torch.no_grad()
def evaluation_sums(fabric: Fabric, task: Task, inputs: Tensor, targets: Tensor, batch_size: int) -> dict[str, Tensor]:
    """`validation_step` sums (`correct`, `total`, `loss_sum`) of the task's current model over a dataset.

    Local to this process: the orchestrator adds them over ranks; an attacker measures its own model.
    """
    task.eval()
    sums = {key: torch.zeros((), device=inputs.device) for key in ("correct", "total", "loss_sum")}
    for batch_idx, start in enumerate(range(0, inputs.shape[0], batch_size)):
        with fabric.autocast():
            step = task.validation_step((inputs[start:start + batch_size], targets[start:start + batch_size]),
                                        batch_idx)
        for key, value in step.items():
            sums[key] = sums[key] + value
    return sums
