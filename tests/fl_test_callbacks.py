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
