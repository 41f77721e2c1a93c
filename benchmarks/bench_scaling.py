"""How seconds per round grow with m (clients per round) and with the model: a table and a plot.

Each (task, m) pair runs `python -m fl_lightning fit` in a child process with evaluation only at
the end, so a round's `seconds` is local training plus gather and aggregation; the last round
(which evaluates) and the first (warm-up) are dropped when there are enough rounds. Models: the
EMNIST CNN (W-EMNIST settings: K=1000, E=2, B=32), VGG-9 on the CIFAR-10 subset (paper preset:
K=200 on the offline 20k JPEG subset, E=2, B=32) and the Sentiment140 LSTM (paper preset: K=1948, E=2, B=20).

    FL_LIGHTNING_DATA=../shared/data python benchmarks/bench_scaling.py --plot benchmarks/scaling.png

`--rounds` is per task (`emnist=4,cifar10=1,...`): a VGG-9 round with m=100 takes minutes on a CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from common import W_EMNIST, run_fit

TASK_ARGS = {
    "emnist": W_EMNIST,
    "cifar10": ["--task", "cifar10", "--data.source", "jpeg"],  # the offline 20k subset: K=200 gives ~100 per client
    "sentiment140": ["--task", "sentiment140"],
}
DEFAULT_ROUNDS = "emnist=5,cifar10=1,sentiment140=5"


def measured_rows(rows: list[dict]) -> list[dict]:
    """Rounds without warm-up and without the final evaluation, when there are enough of them."""
    if len(rows) >= 3:
        return rows[1:-1]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(TASK_ARGS))
    parser.add_argument("--ms", default="10,30,100", help="clients per round to try")
    parser.add_argument("--rounds", default=DEFAULT_ROUNDS, help="rounds per run, per task (task=N,...)")
    parser.add_argument("--extra", default="", help="extra fit arguments for every run (e.g. '--devices 2')")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of seconds per round against m")
    args = parser.parse_args()
    rounds = {k: int(v) for k, v in (item.split("=") for item in args.rounds.split(","))}
    results = []
    for task in args.tasks.split(","):
        for m in (int(x) for x in args.ms.split(",")):
            run = run_fit([*TASK_ARGS[task], "--fl.clients_per_round", str(m), "--fl.eval_every", "0",
                           *args.extra.split()], rounds.get(task, 3))
            rows = measured_rows(run["rows"])
            train = [r["seconds"] - r.get("eval_seconds", 0.0) for r in rows]
            examples = [r["train_examples"] for r in rows]
            results.append({"task": task, "m": m, "rounds": len(rows), "seconds": statistics.median(train),
                            "examples": statistics.mean(examples),
                            "ms_per_example": 1e3 * sum(train) / sum(examples), "maxrss_mib": run["maxrss_mib"]})
            print(f"{task} m={m}: {results[-1]['seconds']:.2f} s/round", file=sys.stderr, flush=True)
    print("| task | m | rounds timed | s/round (median) | examples/round | ms per example | s/round per client |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['task']} | {r['m']} | {r['rounds']} | {r['seconds']:.2f} | {r['examples']:.0f} | "
              f"{r['ms_per_example']:.3f} | {r['seconds'] / r['m']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.plot:
        plot(results, args.plot)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for task in dict.fromkeys(r["task"] for r in results):
        points = [(r["m"], r["seconds"]) for r in results if r["task"] == task]
        ax.plot(*zip(*points), marker="o", label=task)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("clients per round (m)")
    ax.set_ylabel("seconds per round (training + aggregation)")
    ax.set_title("Round time against m (CPU)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
