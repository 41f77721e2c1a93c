"""Workload W-EMNIST: `fl_lightning` against the tuned bare loop (`../shared/bench/limit_emnist.py`), same sitting.

W-EMNIST is FedAvg with the EMNIST CNN (1.2M parameters) on MNIST: K=1000 clients (Dirichlet 0.5),
m=30 per round, 2 local epochs, batch 32, SGD lr 0.1 momentum 0.9 weight decay 1e-4, evaluation on
the 10k test images every round (batch 64). Each configuration runs in its own process; the
configurations are interleaved (one round-robin pass per repeat) so that load drift on a shared
machine hits all of them alike, and the ratios are taken within the sitting.

    FL_LIGHTNING_DATA=../shared/data python benchmarks/bench_wemnist.py --rounds 8 --repeats 2

Configurations (`--configs`):
    limit        the bare loop, glibc malloc tuned (`--malloc-tune`), 2 threads: the yardstick
    limit-plain  the bare loop with default malloc
    engine       `python -m fl_lightning fit`, 1 process, threads = cores (malloc tuned by default)
    engine-plain the same with `--malloc_tuning false`
    engine-2proc 2 Fabric processes (gloo), 1 thread each: clients trained in parallel
    engine-vmap  1 process, `--client.batching vmap`

The first measured round of every run is a warm-up and is dropped. Clients differ between the bare
loop and the engine (different samplers), so the table also gives the mean number of training
examples per round; the ratio column compares median seconds per round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, W_EMNIST, run_fit

DEFAULT_LIMIT = REPO.parent / "shared" / "bench" / "limit_emnist.py"
ENGINE_FLAGS = {
    "engine": [],
    "engine-plain": ["--malloc_tuning", "false"],
    "engine-2proc": ["--devices", "2", "--accelerator", "cpu"],
    "engine-vmap": ["--client.batching", "vmap"],
}
LIMIT_FLAGS = {"limit": ["--malloc-tune"], "limit-plain": []}


def run_limit(name: str, limit: Path, rounds: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "limit.json"
        cmd = [sys.executable, str(limit), "--rounds", str(rounds), "--warmup", "1", "--threads", str(threads),
               "--json", str(out), *LIMIT_FLAGS[name]]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        summary = json.loads(out.read_text())
    measured = [r for r in summary["rounds"] if not r["warmup"]]
    return {"seconds": [r["sec"] for r in measured], "examples": [r["samples"] for r in measured],
            "eval_seconds": [r["eval"] for r in measured], "final_acc": summary["final_acc"],
            "maxrss_mib": summary["ru_maxrss_mib"]}


def run_engine(name: str, rounds: int, extra: list[str]) -> dict:
    # one warm-up round on top of the measured ones, as the bare loop does; evaluation every round
    result = run_fit([*W_EMNIST, "--fl.eval_every", "1", *ENGINE_FLAGS[name], *extra], rounds + 1)
    rows = [r for r in result["rows"] if r["round"] >= 2]
    return {"seconds": [r["seconds"] for r in rows], "examples": [r["train_examples"] for r in rows],
            "eval_seconds": [r["eval_seconds"] for r in rows], "final_acc": rows[-1]["main_acc"],
            "maxrss_mib": result["maxrss_mib"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="measured rounds per run (plus one warm-up)")
    parser.add_argument("--repeats", type=int, default=2, help="round-robin passes over the configurations")
    parser.add_argument("--configs", default="limit,limit-plain,engine,engine-plain,engine-2proc",
                        help=f"comma-separated, from: {', '.join([*LIMIT_FLAGS, *ENGINE_FLAGS])}")
    parser.add_argument("--limit", type=Path, default=DEFAULT_LIMIT, help="path of limit_emnist.py")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="threads of the bare loop")
    parser.add_argument("--engine-args", default="", help="extra arguments for every engine run")
    parser.add_argument("--json", type=Path, default=None, help="write all per-round figures here")
    args = parser.parse_args()
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in LIMIT_FLAGS and c not in ENGINE_FLAGS]
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}")
    if any(c in LIMIT_FLAGS for c in configs) and not args.limit.is_file():
        parser.error(f"{args.limit} not found (pass --limit PATH)")

    results: dict[str, list[dict]] = {c: [] for c in configs}
    started = time.time()
    for repeat in range(args.repeats):
        for name in configs:
            t0 = time.perf_counter()
            if name in LIMIT_FLAGS:
                result = run_limit(name, args.limit, args.rounds, args.threads)
            else:
                result = run_engine(name, args.rounds, args.engine_args.split())
            results[name].append(result)
            print(f"[{repeat + 1}/{args.repeats}] {name}: median {statistics.median(result['seconds']):.3f} s/round "
                  f"({time.perf_counter() - t0:.0f} s wall)", file=sys.stderr, flush=True)

    def pooled(name: str, key: str) -> list[float]:
        return [v for run in results[name] for v in run[key]]

    base = statistics.median(pooled(configs[0], "seconds"))
    print(f"\nW-EMNIST, {args.repeats} x {args.rounds} measured rounds per configuration; "
          f"load average at the end {os.getloadavg()[0]:.1f}\n")
    print(f"| configuration | median s/round | mean s/round | mean examples/round | final acc | vs {configs[0]} |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in configs:
        secs, examples = pooled(name, "seconds"), pooled(name, "examples")
        print(f"| {name} | {statistics.median(secs):.3f} | {statistics.mean(secs):.3f} | "
              f"{statistics.mean(examples):.0f} | {results[name][-1]['final_acc']:.4f} | "
              f"{statistics.median(secs) / base:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"limit": str(args.limit), "json": str(args.json)},
                                         "started": started, "results": results}, indent=1))


if __name__ == "__main__":
    main()
