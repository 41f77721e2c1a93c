"""Run outputs: `RunLogger` writes config.yaml, `metrics.csv`, W&B and the progress display. Rank 0 only.

W&B runs online when the user has credentials (`WANDB_API_KEY` or a `~/.netrc` entry from
`wandb login`) and offline otherwise, with a one-line hint to `wandb sync`; it never prompts.
Under `wandb agent` the run joins the one the agent created. The W&B run is made here with
`wandb.init`, not handed to `Fabric(loggers=...)`: the run directory (and so its name) is known only
after rank 0 broadcast it, and a resumed run continues its W&B run by the id kept in the checkpoint.
"""

from __future__ import annotations

import csv
import netrc
import os
import shutil
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fl_lightning.config import LogArgs, flatten_config
from fl_lightning.metrics import METRIC_COLUMNS, wandb_key


class RunLogger:
    """Everything a run writes besides checkpoints, on rank 0 (a no-op on other ranks).

    Opening it creates the run directory and writes `config.yaml` and the task's artifacts; then
    `log_round` appends a `metrics.csv` row, logs to W&B at step `round` and advances the progress bar.

    Args:
        run_dir: The run directory.
        config: The resolved configuration, written to `config.yaml` (and to W&B once, flattened).
        log: Where metrics go.
        artifacts: Files to copy into the run directory, by name (e.g. a trained tokenizer).
        total_rounds: Rounds of the run (for the progress bar).
        task_name: Shown by the progress bar.
        resumed_round: The checkpoint's round when resuming (later metrics rows are dropped), else None.
        wandb_id: The W&B run to continue, else None.
        enabled: False on ranks other than 0.
    """

    def __init__(self, run_dir: Path, config: dict[str, Any], log: LogArgs, artifacts: dict[str, Path],
                 total_rounds: int, task_name: str, resumed_round: int | None, wandb_id: str | None,
                 enabled: bool) -> None:
        self.run_dir, self.enabled, self.wandb_id = run_dir, enabled, wandb_id
        self.metrics_csv: MetricsCSV | None = None
        self.wandb: Any = None
        self.progress: RoundProgress | None = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "config.yaml", "w") as handle:
            yaml.safe_dump(config, handle, sort_keys=False)
        for file_name, source in artifacts.items():
            shutil.copy2(source, run_dir / file_name)
        if log.logger != "none":
            self.metrics_csv = MetricsCSV(run_dir / "metrics.csv", resume_round=resumed_round)
        self.wandb = start_wandb_run(log, run_dir, run_dir.name, wandb_id)
        if self.wandb is not None:
            self.wandb_id = self.wandb.id
            if resumed_round is None:
                self.wandb.config.update(flatten_config(config), allow_val_change=True)
        self.progress = RoundProgress(total_rounds, resumed_round or 0, log.progress_bar, task_name)

    def log_round(self, round_idx: int, metrics: dict[str, float], rejected: list[int] = ()) -> None:
        """One round's metrics (round 0: the start model) to every sink."""
        if not self.enabled:
            return
        if rejected:
            print(f"round {round_idx}: rejected non-finite updates of clients {rejected}", file=sys.stderr)
        if self.metrics_csv is not None:
            self.metrics_csv.append({"round": round_idx, **metrics})
        if self.wandb is not None:
            self.wandb.log({"round": round_idx, **{wandb_key(k): v for k, v in metrics.items()}})
        if self.progress is not None and round_idx > 0:
            self.progress.update(round_idx, metrics)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.wandb is not None:
            self.wandb.finish()


def has_wandb_credentials() -> bool:
    """Whether W&B could log in without asking: an API key in the environment or in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def start_wandb_run(log: LogArgs, run_dir: Path, name: str, run_id: str | None) -> Any:
    """A W&B run, online with credentials, offline otherwise; never interactive.

    Metrics are plotted against their own `round` key (not W&B's internal step), so a resumed run
    may log again the rounds after its checkpoint.

    Returns:
        The `wandb` run, or None when `log.logger` is not `wandb`.
    """
    if log.logger != "wandb":
        return None
    import wandb

    mode = os.environ.get("WANDB_MODE")  # the user's explicit choice wins (e.g. disabled)
    offline = mode in ("offline", "dryrun") or (mode is None and not has_wandb_credentials())
    run = wandb.init(name=name, dir=str(run_dir), project=log.project, entity=log.entity, group=log.group,
                     tags=log.tags, id=run_id, resume="allow", mode="offline" if offline else None,
                     settings=wandb.Settings(silent=True))
    run.define_metric("round")
    run.define_metric("*", step_metric="round")
    if offline:
        print(f"W&B is offline (no credentials); upload later with: wandb sync {run_dir / 'wandb'}/offline-run-*",
              file=sys.stderr)
    return run


class MetricsCSV:
    """`metrics.csv`: one row per round, rewritten atomically so a kill never leaves a torn file.

    On resume, rows after the checkpoint's round are dropped: they are about to be recomputed.
    """

    def __init__(self, path: Path, resume_round: int | None = None) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        if resume_round is not None and self.path.is_file():
            with open(self.path, newline="") as handle:
                self.rows = [row for row in csv.DictReader(handle) if int(row["round"]) <= resume_round]

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        columns = [c for c in METRIC_COLUMNS if any(c in r for r in self.rows)]
        columns += sorted({k for r in self.rows for k in r} - set(columns))
        partial = self.path.with_name(self.path.name + ".tmp")
        with open(partial, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(partial, self.path)


class RoundProgress:
    """A rich progress bar over rounds with the latest accuracies; plain lines when not on a terminal."""

    def __init__(self, total_rounds: int, start_round: int, enabled: bool, task_name: str) -> None:
        self.console = Console(stderr=True)
        self.enabled = enabled
        self.live = enabled and self.console.is_terminal
        self.total_rounds = total_rounds
        self.progress: Progress | None = None
        if self.live:
            self.progress = Progress(TextColumn(f"[bold]{task_name}[/] round"), MofNCompleteColumn(), BarColumn(),
                                     TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                     console=self.console)
            self.bar = self.progress.add_task("rounds", total=total_rounds, completed=start_round, status="")
            self.progress.start()

    def update(self, round_idx: int, metrics: dict[str, Any]) -> None:
        status = "  ".join(f"{key} {metrics[key]:.4f}" for key in ("main_acc", "backdoor_acc") if key in metrics)
        if self.progress is not None:
            self.progress.update(self.bar, completed=round_idx, status=status)
        elif self.enabled and status:
            self.console.print(f"round {round_idx}/{self.total_rounds}  {status}  ({metrics['seconds']:.2f} s)",
                               highlight=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
