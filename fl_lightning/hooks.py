"""The callback contract: which hooks fire when, with what, and what each may change.

The orchestrator calls hooks through `fabric.call(name, **kwargs)`, which passes each callback only
the keyword arguments its method names. Hooks run on **every rank** with identical inputs (the
client hooks on the rank that trains the client), so any decision in them must be a pure function
of (seed, round_idx, client_id) and the hook's arguments: that is what keeps results the same on 1
and N processes and after a resume.

| hook | when | arguments | may change |
|---|---|---|---|
| `check_run` | before launch, on the resolved settings | fl | nothing (raise `ConfigError`) |
| `on_fit_start` | after data and model are built | task, data, fabric, seed | own state |
| `on_round_start` | after client selection | round_idx, plan | `plan.is_adversary` |
| `on_client_start` | before a client's local training | ctx | ctx data, lr, epochs... |
| `on_after_optimizer_step` | after every local optimizer step | ctx, batch_idx | the model (projection) |
| `on_client_end` | after local training, before sending | ctx, update | `update.delta` in place |
| `on_before_aggregate` | after gathering, before the aggregator | updates, round_idx | `updates.deltas` rows |
| `on_after_aggregate` | after the aggregator | aggregate, round_idx | nothing (inspect) |
| `on_round_end` | after evaluation, before logging | round_idx, metrics | add keys to `metrics` |
| `on_fit_end` | after the last round | (none) | own state |

Per-client values a callback wants logged go into `update.stats` (on the training rank): they are
gathered with the update, so rank 0 can log them whichever rank trained the client.

`update.delta` is the client's row of the run's round buffer (`distributed.UpdateGatherer`):
change it in place (`update.delta.mul_(scale)`); a new tensor assigned to it is copied into the
row at the gather. The gathered `updates.deltas` is that buffer, reused next round and, on several
CPU processes of one machine, shared by the ranks: keep no reference past the round, and change
rows only in `on_before_aggregate` (a run with such a hook gets a private copy on every rank).

With `--client.batching vmap` (`batched.py`) the rank's honest clients train together: all their
`on_client_start` calls come first, then the batched steps, then their `on_client_end` calls (the
model then holds that client's trained parameters). `on_after_optimizer_step` fires only for the
clients still trained one by one: attackers (`ctx.is_adversary`) and clients whose
`on_client_start` set `ctx.optimizer`. A hook that must act on an honest client's every step needs
`--client.batching sequential`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning.fabric import Fabric

    from fl_lightning.aggregation import Aggregate
    from fl_lightning.config import FLArgs
    from fl_lightning.task import FederatedData, Task
    from fl_lightning.types import ClientUpdate, LocalTraining, RoundPlan, RoundUpdates


class FLCallback:
    """Base class of attacks and other run callbacks; every hook does nothing by default.

    Store each constructor argument under an attribute of the same name, so the run's resolved
    configuration can be written back. Callbacks with state that must survive a resume implement
    `state_dict` / `load_state_dict` (JSON-serialisable values only).
    """

    def check_run(self, fl: FLArgs) -> None:
        """Raises `ConfigError` if the callback cannot run with these federated settings.

        Called before any process starts (and by `sweep` for every planned run), so a setting that
        cannot work (e.g. more attackers per round than clients per round) stops before any work.
        """

    def on_fit_start(self, task: Task, data: FederatedData, fabric: Fabric, seed: int) -> None:
        """Called once, after the task's data and model are built."""

    def on_round_start(self, round_idx: int, plan: RoundPlan) -> None:
        """Called after the round's clients are selected; may mark slots adversarial."""

    def on_client_start(self, ctx: LocalTraining) -> None:
        """Called before a client's local training; may swap its data, lr, epochs or optimizer."""

    def on_after_optimizer_step(self, ctx: LocalTraining, batch_idx: int) -> None:
        """Called after every local optimizer step (e.g. PGD projection)."""

    def on_client_end(self, ctx: LocalTraining, update: ClientUpdate) -> None:
        """Called after local training, before the update leaves the rank (e.g. model replacement)."""

    def on_before_aggregate(self, updates: RoundUpdates, round_idx: int) -> None:
        """Called on the gathered updates, identical on every rank."""

    def on_after_aggregate(self, aggregate: Aggregate, round_idx: int) -> None:
        """Called with the aggregator's result."""

    def on_round_end(self, round_idx: int, metrics: dict[str, float]) -> None:
        """Called with the round's metrics; may add its own keys."""

    def on_fit_end(self) -> None:
        """Called after the last round."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state to checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores `state_dict`."""
