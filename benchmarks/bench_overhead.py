"""`fit` against `bare_loop.py` (and against an older checkout of the engine), in alternating runs of one sitting.

Issue 18's measurement: `python -m fl_lightning fit --task sentiment140` as a new user runs it (the
task's preset, 1 thread, evaluation off, no checkpoints) against `benchmarks/bare_loop.py --task
sentiment140 --threads 1` on the same clients. Each run is its own process; the configurations
alternate (one of each per pass), so load drift on a shared machine hits them alike. Per run, the
median s/round over rounds 2..R (round 1 is a warm-up); the engine's last round also evaluates
(`fit` always evaluates after the last round), so its evaluation seconds are subtracted. Wall
time and process CPU time are both reported (the engine's CPU time per round comes from the
`round_cpu.RoundCPU` callback; its median is over rounds 2..R-1, since the last round's CPU time
holds the evaluation): on a loaded machine the CPU figures are the ones to compare.

    FL_LIGHTNING_DATA=../shared/data python benchmarks/bench_overhead.py --pairs 7 --rounds 10
    # the engine of another checkout, laid out as an importable package (fl_lightning/ with tasks/
    # and callbacks/ inside), against this one: W-EMNIST, no bare loop
    FL_LIGHTNING_DATA=../shared/data python benchmarks/bench_overhead.py --workload wemnist \\
        --configs engine,engine-base --base /tmp/base --pairs 3 --rounds 5

Configurations (`--configs`): `bare` (bare_loop.py), `engine` (this checkout's `fit`), `engine-base`
(`fit` of the checkout at `--base`, through PYTHONPATH).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, W_EMNIST

WORKLOADS = {
    "sentiment140": {"fit": ["--task", "sentiment140"], "bare": ["--task", "sentiment140"]},
    "wemnist": {"fit": W_EMNIST, "bare": None},
}


def run_engine(args: argparse.Namespace, base: str | None) -> tuple[list[float], list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "fl_lightning", "fit", *WORKLOADS[args.workload]["fit"],
               "--fl.rounds", str(args.rounds), "--fl.eval_every", "0", "--fl.checkpoint_every", "0",
               "--log.logger", "csv", "--log.progress_bar", "false", "--num_threads", str(args.threads),
               "--out_dir", tmp, "--name", "run", "--callbacks+=round_cpu.RoundCPU"]
        bench = str(REPO / "benchmarks")
        env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": f"{base}:{bench}" if base else bench}
        subprocess.run(cmd, env=env, cwd=base or REPO, check=True, capture_output=True)
        with open(Path(tmp) / "run" / "metrics.csv", newline="") as handle:
            rows = [r for r in csv.DictReader(handle) if int(r["round"]) >= 1]
    wall = [float(r["seconds"]) - float(r.get("eval_seconds") or 0.0) for r in rows]
    return wall, [float(r["cpu_seconds"]) for r in rows]


def run_bare(args: argparse.Namespace) -> tuple[list[float], list[float]]:
    cmd = [sys.executable, str(REPO / "benchmarks" / "bare_loop.py"), *WORKLOADS[args.workload]["bare"],
           "--rounds", str(args.rounds), "--threads", str(args.threads)]
    out = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True).stdout
    found = re.findall(r"round \d+: wall ([0-9.]+) s cpu ([0-9.]+) s", out)
    return [float(w) for w, _ in found], [float(c) for _, c in found]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="sentiment140")
    parser.add_argument("--configs", default="bare,engine")
    parser.add_argument("--base", default=None, help="an older checkout laid out as a package (engine-base)")
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    configs = args.configs.split(",")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"{args.workload}: {args.pairs} passes of {configs}, {args.rounds} rounds, {args.threads} thread(s); "
          f"{cpu}; load {os.getloadavg()}", flush=True)
    medians: dict[str, dict[str, list[float]]] = {"wall": {c: [] for c in configs}, "cpu": {c: [] for c in configs}}
    for p in range(args.pairs):
        for config in configs:
            if config == "bare":
                wall, cpu_s = run_bare(args)
            else:
                wall, cpu_s = run_engine(args, args.base if config == "engine-base" else None)
            # Round 1 is a warm-up; the engine's last round also evaluates (its CPU time holds that).
            medians["wall"][config].append(statistics.median(wall[1:]))
            medians["cpu"][config].append(statistics.median(cpu_s[1:-1]))
            print(f"pass {p + 1} {config}: median wall {medians['wall'][config][-1]:.3f} s/round "
                  f"(rounds {', '.join(f'{s:.2f}' for s in wall)}), median CPU {medians['cpu'][config][-1]:.3f} "
                  f"s/round; load {os.getloadavg()[0]:.2f}", flush=True)
    for kind in ("wall", "cpu"):
        runs = medians[kind]
        reference = statistics.median(runs[configs[0]])
        for config in configs:
            med = statistics.median(runs[config])
            ratios = [m / r for m, r in zip(runs[config], runs[configs[0]])]
            print(f"{kind}: {config}: median of run medians {med:.3f} s/round, {med / reference:.3f}x "
                  f"{configs[0]}; per pass {', '.join(f'{r:.3f}' for r in ratios)}")

if __name__ == "__main__":
    main()
