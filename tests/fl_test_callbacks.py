"""Callbacks used only by the tests, loaded by class path (`--callbacks+=fl_test_callbacks.KillMidRound`)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch

from fl_lightning.hooks import FLCallback


class KillMidRound(FLCallback):
    """SIGKILLs its own process after client slot `slot` of round `round_idx` trained, once.

    The marker file makes it fire only once, so the resumed run (which reloads the same config) goes on.
    """

    def __init__(self, round_idx: int, slot: int, marker: str) -> None:
        self.round_idx, self.slot, self.marker = round_idx, slot, marker

    def on_client_end(self, ctx, update) -> None:
        if ctx.round_idx == self.round_idx and ctx.slot == self.slot and not Path(self.marker).exists():
            Path(self.marker).write_text("killed")
            os.kill(os.getpid(), signal.SIGKILL)


class PoisonWithNaN(FLCallback):
    """Turns the update of client slot `slot` into NaN in round `round_idx` (a broken client)."""

    def __init__(self, round_idx: int, slot: int) -> None:
        self.round_idx, self.slot = round_idx, slot

    def on_client_end(self, ctx, update) -> None:
        if ctx.round_idx == self.round_idx and ctx.slot == self.slot:
            update.delta[0] = torch.nan


class NoDropout(FLCallback):
    """Sets every `nn.Dropout` of the task to p = 0, so runs that draw dropout differently can be compared."""

    def on_fit_start(self, task, data, fabric, seed) -> None:
        for module in task.modules():
            if isinstance(module, torch.nn.modules.dropout._DropoutNd):
                module.p = 0.0


class VaryClients(FLCallback):
    """Gives every client slot its own lr, epochs, batch size, momentum, weight decay and clipping.

    With `own_optimizer_slot` >= 0, that slot gets a hook-built optimizer (Nesterov SGD, which only
    the sequential path runs), so a batched run must train it sequentially.
    """

    def __init__(self, own_optimizer_slot: int = -1) -> None:
        self.own_optimizer_slot = own_optimizer_slot

    def on_client_start(self, ctx) -> None:
        k = ctx.slot
        ctx.lr *= 1.0 + 0.5 * (k % 3)
        ctx.epochs = 1 + k % 3
        ctx.batch_size = 6 + 5 * (k % 4)
        ctx.momentum = 0.9 if k % 2 else 0.0
        ctx.weight_decay = 1e-3 * (k % 3)
        ctx.grad_clip_norm = 0.5 if k % 2 else 0.0
        if k == self.own_optimizer_slot:
            ctx.optimizer = torch.optim.SGD([p for p in ctx.model.parameters() if p.requires_grad], lr=ctx.lr,
                                            momentum=0.9, nesterov=True)
