"""Run outputs: the W&B logger, `metrics.csv`, and the progress display. Rank 0 only.

W&B runs online when the user has credentials (`WANDB_API_KEY` or a `~/.netrc` entry from
`wandb login`) and offline otherwise, with a one-line hint to `wandb sync`; it never prompts.
Under `wandb agent` the logger joins the run the agent created.
"""

from __future__ import annotations

import csv
import netrc
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fl_lightning.config import LogArgs

METRIC_COLUMNS = ("round", "main_acc", "backdoor_acc", "main_loss", "train_loss", "train_loss_benign",
                  "train_loss_adv", "update_norm_mean", "update_norm_benign", "update_norm_adv", "aggregate_norm",
                  "adversary_weight", "num_adversaries", "rejected_updates", "lr", "train_examples", "seconds",
                  "eval_seconds")


def has_wandb_credentials() -> bool:
    """Whether W&B could log in without asking: an API key in the environment or in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def make_wandb_logger(log: LogArgs, run_dir: Path, name: str, run_id: str | None) -> Any:
    """Lightning's `WandbLogger`, online with credentials, offline otherwise; never interactive.

    Returns:
        The logger, or None when `log.logger` is not `wandb`.
    """
    if log.logger != "wandb":
        return None
    from lightning.pytorch.loggers import WandbLogger

    mode = os.environ.get("WANDB_MODE")  # the user's explicit choice wins (e.g. disabled)
    offline = mode in ("offline", "dryrun") or (mode is None and not has_wandb_credentials())
    logger = WandbLogger(name=name, save_dir=str(run_dir), project=log.project, entity=log.entity, group=log.group,
                         tags=log.tags, offline=offline, id=run_id, resume="allow" if run_id else None,
                         settings={"silent": True})
    if offline:
        print(f"W&B is offline (no credentials); upload later with: wandb sync {run_dir / 'wandb'}/offline-run-*",
              file=sys.stderr)
    return logger


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
