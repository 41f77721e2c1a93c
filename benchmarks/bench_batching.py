"""Rounds per second with `--client.batching sequential` against `vmap`, on 1 and 2 processes (or a GPU).

Workloads (`--tasks`):
    emnist   W-EMNIST (`common.W_EMNIST`): EMNIST CNN on MNIST, K=1000, m=30, E=2, B=32, SGD 0.1/0.9/1e-4,
             lr decay 1, evaluation every round with batch 64
    cifar10  CIFAR-10 with VGG-9, m=10, the task's preset otherwise (K=200, E=2, B=32, lr 0.02);
             `--cifar_source jpeg` (the default) reads the offline 20k JPEG subset, `cifar10` the full archive

Each configuration (task x processes x batching) runs in its own child process with `--log.logger
csv`; the per-round `seconds` column of its metrics.csv is read back and the first round (warm-up:
allocator, first vmap trace) is dropped. Configurations are interleaved, one round-robin pass per
repeat with the order rotated each pass, so load drift on a shared machine hits all of them alike.
On CPU each process gets `cores / processes` threads (`--devices N --accelerator cpu`); with
`--accelerator gpu` the process count is the number of GPUs.

    FL_LIGHTNING_DATA=../shared/data python benchmarks/bench_batching.py --rounds 6 --repeats 3
    FL_LIGHTNING_DATA=../shared/data python benchmarks/bench_batching.py --accelerator gpu --processes 1

Prints a Markdown table (median seconds per round, rounds per second, speed-up over sequential on
1 process of the same task) and writes every per-round figure to `--out` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from common import W_EMNIST, run_fit

TASKS = {
    "emnist": [*W_EMNIST, "--fl.eval_every", "1"],
    "cifar10": ["--task", "cifar10", "--fl.clients_per_round", "10", "--fl.eval_every", "1", "--fl.eval_batch_size",
                "64"],
}
MODES = ("sequential", "vmap")


def configurations(tasks: list[str], processes: list[int]) -> list[dict]:
    return [{"task": t, "processes": p, "batching": b} for t in tasks for p in processes for b in MODES]


def label(config: dict) -> str:
    return f"{config['task']}/{config['processes']}p/{config['batching']}"


def fit_args(config: dict, accelerator: str, cores: int, cifar_source: str, extra: list[str]) -> list[str]:
    args = [*TASKS[config["task"]], "--client.batching", config["batching"], "--accelerator", accelerator,
            "--devices", str(config["processes"])]
    if config["task"] == "cifar10":
        args += ["--data.source", cifar_source]
    if accelerator == "cpu":
        args += ["--num_threads", str(max(1, cores // config["processes"]))]
    return args + extra


def summarize(results: dict[str, dict], configs: list[dict]) -> list[dict]:
    """Median s/round per configuration and its speed-up over sequential on 1 process (same task)."""
    rows = []
    for config in configs:
        seconds = results[label(config)]["seconds"]
        median = statistics.median(seconds) if seconds else None
        rows.append({**config, "median_s": median, "rounds_per_s": 1 / median if median else None,
                     "samples": len(seconds), "error": results[label(config)].get("error")})
    for row in rows:
        base = next((r["median_s"] for r in rows if r["task"] == row["task"] and r["processes"] == 1
                     and r["batching"] == "sequential"), None)
        row["speedup_vs_seq_1p"] = base / row["median_s"] if base and row["median_s"] else None
    return rows


def markdown(rows: list[dict]) -> str:
    def fmt(value: float | None, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    lines = ["| task | processes | batching | median s/round | rounds/s | vs sequential 1 process | rounds |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        note = f" (failed: {r['error'].splitlines()[-1][:80]})" if r["error"] else ""
        lines.append(f"| {r['task']} | {r['processes']} | {r['batching']}{note} | {fmt(r['median_s'], '.3f')} | "
                     f"{fmt(r['rounds_per_s'], '.3f')} | {fmt(r['speedup_vs_seq_1p'], '.2f')}x | {r['samples']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="rounds per run; the first is dropped as warm-up")
    parser.add_argument("--repeats", type=int, default=3, help="round-robin passes over the configurations")
    parser.add_argument("--tasks", default="emnist,cifar10", help=f"comma-separated, from: {', '.join(TASKS)}")
    parser.add_argument("--processes", default=None, help="comma-separated process counts (default: 1,2 on CPU, "
                                                          "1 on GPU)")
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--cifar_source", choices=("jpeg", "cifar10"), default="jpeg",
                        help="CIFAR-10 data: the offline JPEG subset or the full archive (downloaded if missing)")
    parser.add_argument("--out", type=Path, default=Path("bench_batching.json"), help="JSON with every figure")
    parser.add_argument("--extra", default="", help="extra fit arguments for every run, e.g. a smaller "
                                                    "'--fl.clients_per_round 4' for a smoke test")
    parser.add_argument("--dry_run", action="store_true", help="print the fit arguments of each configuration")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be >= 2 (the first round is dropped)")
    tasks = [t for t in args.tasks.split(",") if t]
    if unknown := sorted(set(tasks) - set(TASKS)):
        parser.error(f"unknown task(s) {unknown}; choose from {list(TASKS)}")
    processes = [int(p) for p in (args.processes or ("1,2" if args.accelerator == "cpu" else "1")).split(",")]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    configs = configurations(tasks, processes)
    extra = args.extra.split()
    if args.dry_run:
        for config in configs:
            print(label(config), " ".join(fit_args(config, args.accelerator, cores, args.cifar_source, extra)))
        return

    results: dict[str, dict] = {label(c): {**c, "seconds": [], "runs": []} for c in configs}
    started = time.time()
    for repeat in range(args.repeats):
        shift = repeat % len(configs)
        for config in configs[shift:] + configs[:shift]:  # rotated, so no configuration always runs first
            entry = results[label(config)]
            print(f"[pass {repeat + 1}/{args.repeats}] {label(config)} ...", file=sys.stderr, flush=True)
            try:
                run = run_fit(fit_args(config, args.accelerator, cores, args.cifar_source, extra), args.rounds)
            except RuntimeError as err:  # e.g. a task vmap cannot train: recorded, the others go on
                entry["error"] = str(err)
                continue
            measured = [r["seconds"] for r in run["rows"] if r["round"] >= 2]  # round 1 is the warm-up
            entry["seconds"] += measured
            entry["runs"].append({"repeat": repeat, "seconds": measured, "wall": run["wall"],
                                  "maxrss_mib": run["maxrss_mib"], "final_main_acc": run["rows"][-1].get("main_acc")})

    rows = summarize(results, configs)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    header = (f"{platform.processor() or platform.machine()}, {cores} cores, load average {load}, torch "
              f"{torch.__version__}, accelerator {args.accelerator}, {args.rounds} rounds x {args.repeats} repeats "
              f"(first round of each run dropped), {(time.time() - started) / 60:.1f} min")
    print(header)
    print(markdown(rows))
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "machine": header, "summary": rows,
                                    "runs": results}, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
