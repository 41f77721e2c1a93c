"""One client's local training.

`train_client` runs a client's local epochs through the task's `training_step` on the rank's one
model (reloaded from the flat global vector, never deep-copied), with a fresh SGD optimizer, and
returns its update. Attacks hook in through `on_client_start`, `on_after_optimizer_step` and
`on_client_end` (see `hooks.py`); an attack that needs side training (the prox attack's estimate of
the honest model) calls `train_epochs` on a context of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fl_lightning.params import flat_params, load_flat_params_
from fl_lightning.task import iterate_batches
from fl_lightning.types import ClientUpdate, LocalTraining

if TYPE_CHECKING:
    from lightning.fabric import Fabric

    from fl_lightning.config import ClientArgs
    from fl_lightning.task import Task


def client_lr(client: ClientArgs, round_idx: int) -> float:
    """The reference's per-round decay: `lr * lr_decay ** (round_idx - 1)`."""
    return client.lr * lr_scale(client, round_idx)


def lr_scale(client: ClientArgs, round_idx: int) -> float:
    """The decay factor of a round, `lr_decay ** (round_idx - 1)`."""
    return client.lr_decay ** (round_idx - 1)


def train_client(fabric: Fabric, task: Task, ctx: LocalTraining) -> ClientUpdate:
    """Trains one client from the global model and returns its update.

    Args:
        fabric: The run's Fabric (hooks go through `fabric.call`; autocast for mixed precision).
        task: The task, whose model is the rank's one model.
        ctx: The client's context; `on_client_start` may change it.
    """
    start_client(fabric, task, ctx)
    return finish_client(fabric, task, ctx)


def start_client(fabric: Fabric, task: Task, ctx: LocalTraining) -> None:
    """Seeds the client's randomness, loads the global model and calls `on_client_start`.

    The batched trainer (`batched.py`) shares this start, so hooks see the same state in both modes.
    """
    # Dropout, augmentation and any attacker draws use torch's global generator: seeding it per
    # client (not per process) is what makes results independent of the number of processes.
    torch.manual_seed(ctx.seed)
    load_flat_params_(task, ctx.global_params)
    fabric.call("on_client_start", ctx=ctx)


def finish_client(fabric: Fabric, task: Task, ctx: LocalTraining) -> ClientUpdate:
    """The rest of `train_client` after `start_client`: local epochs, the update, `on_client_end`."""
    mean_loss = train_epochs(fabric, task, ctx)
    # Local minus global, written into the client's row of the round buffer: no per-client tensor.
    delta = flat_params(task, out=ctx.delta_out).sub_(ctx.global_params)
    update = ClientUpdate(
        slot=ctx.slot, client_id=ctx.client_id, delta=delta,
        num_examples=ctx.num_examples if ctx.num_examples is not None else int(ctx.inputs.shape[0]),
        loss=mean_loss, is_adversary=ctx.is_adversary,
    )
    fabric.call("on_client_end", ctx=ctx, update=update)
    return update


def train_epochs(fabric: Fabric, task: Task, ctx: LocalTraining) -> float:
    """`ctx.epochs` epochs of SGD on `ctx`'s data, from the task's current model; returns the mean loss.

    The optimizer is `ctx.optimizer`, or a fresh `torch.optim.SGD` from `ctx`'s lr, momentum and
    weight decay when a hook set none. No client hook fires here except the per-step one (when
    `ctx.step_hooks`), so attacks can call it for side training on a context of their own.
    """
    params = [p for p in task.parameters() if p.requires_grad]
    if ctx.optimizer is None:
        ctx.optimizer = torch.optim.SGD(params, lr=ctx.lr, momentum=ctx.momentum, weight_decay=ctx.weight_decay)
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
            if ctx.step_hooks:
                fabric.call("on_after_optimizer_step", ctx=ctx, batch_idx=batch_idx)
            loss_sum += loss.detach().float()
            num_steps += 1
    return float(loss_sum) / max(num_steps, 1)


def num_batches(num_examples: int, batch_size: int, drop_last: bool) -> int:
    """Mini-batches per epoch, as `iterate_batches` yields them."""
    return num_examples // batch_size if drop_last else -(-num_examples // batch_size)
