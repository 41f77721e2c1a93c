"""Command line: `python -m fl_lightning fit|validate ...` (jsonargparse, LightningCLI style).

    python -m fl_lightning fit --task sentiment140                 # the paper's preset
    python -m fl_lightning fit --task toy --fl.rounds=3 --aggregator Krum --aggregator.num_adversaries 1
    python -m fl_lightning fit --task toy --print_config > run.yaml
    python -m fl_lightning fit --config run.yaml --seed 1
    python -m fl_lightning fit --resume runs/toy-20261125-120000      # continue from the last checkpoint
    python -m fl_lightning validate --checkpoint runs/toy-20261125-120000
"""

from __future__ import annotations

import sys
from pathlib import Path

from jsonargparse import CLI

import fl_lightning.callbacks  # noqa: F401  (registers the aggregators and callbacks for class-name shorthand)
from fl_lightning.config import ConfigError
from fl_lightning.data import DataError
from fl_lightning.orchestrator import fit, validate

COMMANDS = {"fit": fit, "validate": validate}


def main(argv: list[str] | None = None) -> None:
    """Runs the CLI; a bad setting ends with a one-paragraph error and exit status 2, no traceback."""
    argv = with_resume_config(list(sys.argv[1:] if argv is None else argv))
    try:
        CLI(COMMANDS, args=argv, as_positional=False, prog="python -m fl_lightning",
            description=__doc__.split("\n\n")[0])
    except (ConfigError, DataError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def with_resume_config(argv: list[str]) -> list[str]:
    """`fit --resume DIR` loads `DIR/config.yaml` first, so a resumed run needs no other arguments.

    Later arguments still override it. An explicit `--config` is left alone.
    """
    if not argv or argv[0] != "fit" or any(a == "--config" or a.startswith("--config=") for a in argv):
        return argv
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == "--resume" and i + 1 < len(argv) else (
            arg.split("=", 1)[1] if arg.startswith("--resume=") else None)
        if value and (Path(value) / "config.yaml").is_file():
            return ["fit", "--config", str(Path(value) / "config.yaml"), *argv[1:]]
    return argv


if __name__ == "__main__":
    main()
