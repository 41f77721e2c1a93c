"""A callback that logs each round's process CPU seconds (`cpu_seconds` in metrics.csv), for timing on a loaded machine.

    PYTHONPATH=benchmarks python -m fl_lightning fit ... --callbacks+=round_cpu.RoundCPU

It overrides only `on_round_start` and `on_round_end`, so the run's work is unchanged (no per-step
hook, no private copy of the updates). Wall time on a shared machine swings with the other jobs;
CPU time of a single-threaded process much less.
"""

from __future__ import annotations

import time

from fl_lightning.hooks import FLCallback


class RoundCPU(FLCallback):
    """Adds `cpu_seconds` (process CPU time from round start to round end) to every round's metrics."""

    def __init__(self) -> None:
        self.started = 0.0

    def on_round_start(self, round_idx: int, plan: object) -> None:
        self.started = time.process_time()

    def on_round_end(self, round_idx: int, metrics: dict[str, float]) -> None:
        metrics["cpu_seconds"] = time.process_time() - self.started
