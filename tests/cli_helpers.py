"""Running the CLI as a user does, in a subprocess (needed for DDP launches and SIGKILL)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

TESTS_DIR = Path(__file__).resolve().parent


def run_cli(*args: str, cwd: Path, check: bool = True, env: dict[str, str | None] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m fl_lightning ARGS` with the test callbacks importable; never reads stdin.

    `env` entries override the environment; a value of None removes the variable.
    """
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
                "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"), **(env or {})}
    full_env = {key: value for key, value in full_env.items() if value is not None}
    proc = subprocess.run([sys.executable, "-m", "fl_lightning", *args], cwd=cwd, env=full_env, text=True,
                          capture_output=True, stdin=subprocess.DEVNULL, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def final_model(run_dir: Path) -> torch.Tensor:
    return load_file(str(run_dir / "model.safetensors"))["global_params"]


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    """The CLI in this process: (exit code, stdout, stderr); jsonargparse errors exit with 2."""
    from fl_lightning.__main__ import main

    try:
        main(list(argv))
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err
