"""Helpers shared by the benchmark scripts: run `fl_lightning fit` in a child process and read its metrics."""

from __future__ import annotations

import csv
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

W_EMNIST = ["--task", "emnist", "--data.source", "mnist", "--data.partition", "dirichlet", "--data.alpha", "0.5",
            "--fl.num_clients", "1000", "--fl.clients_per_round", "30", "--client.local_epochs", "2",
            "--client.batch_size", "32", "--client.lr", "0.1", "--client.lr_decay", "1.0", "--client.momentum", "0.9",
            "--client.weight_decay", "1e-4", "--fl.eval_batch_size", "64"]
"""Workload W-EMNIST: FedAvg, EMNIST CNN on MNIST, K=1000 (Dirichlet 0.5), m=30, E=2, B=32, SGD 0.1/0.9/1e-4."""


def run_fit(args: list[str], rounds: int) -> dict:
    """Runs `python -m fl_lightning fit ARGS` for `rounds` rounds (csv logging, no checkpoints) in a child.

    Returns:
        `rows`: metrics.csv rows of rounds >= 1 as floats; `maxrss_mib`: the child's peak resident
        memory (only valid when it is the largest child so far, else None); `wall`: seconds.
    """
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "fl_lightning", "fit", *args, "--fl.rounds", str(rounds), "--out_dir", tmp,
               "--name", "run", "--fl.checkpoint_every", "0", "--log.logger", "csv", "--log.progress_bar", "false"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        env = {**os.environ, "WANDB_MODE": "disabled"}
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"fit {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
        maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        with open(Path(tmp) / "run" / "metrics.csv", newline="") as handle:
            rows = [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(handle)
                    if int(r["round"]) >= 1]
    return {"rows": rows, "maxrss_mib": maxrss / 1024 if maxrss > before else None, "wall": wall}
