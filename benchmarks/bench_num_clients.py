"""Cost against K: workload W-EMNIST at K=1,000 (tile 1) and K=80,000 (tile 80), same m, same sitting.

The speed issue's goal: "Cost does not grow with K: seconds per round and peak memory with
K=80,000 clients within 5% of K=1,000 at the same m." To keep the clients' sizes (and so the work
per round) equal, the K=80,000 runs split 80 copies of MNIST (`--data.tile 80`: index replication,
the images are held once), so both configurations have about 60 examples per client.

    FL_LIGHTNING_DATA=../shared/data python benchmarks/bench_num_clients.py --rounds 8 --repeats 2

Each run is one `python -m fl_lightning fit` child (csv logging, no checkpoints, W&B off); the
configurations alternate (1k, 80k, then 80k, 1k, ...) so load drift on a shared machine hits both
alike. Reported per configuration (medians over repeats; the first round of every run is a warm-up
and is dropped):

* s/round: the `seconds` column of metrics.csv (training, aggregation and the 10k-image evaluation).
* s per 1000 examples: each round's seconds over its training examples (the `train_examples`
  column, else recomputed from the partition and `sampling.sample_clients`), since the 30 sampled
  clients hold different numbers of examples in the two configurations; `train s per 1000
  examples` leaves the evaluation (`eval_seconds`) out when the engine logs it.
* peak RSS: the child's own `ru_maxrss` (from `os.wait4`, so each run is measured alone), and its
  peak so far (`VmHWM`) when the data is ready, which splits setup memory from training memory.
* setup: process start to "data ready" (the "run directory:" line, printed once the task's data is
  built and partitioned) and process start to the start of round 1 (end of round 1 minus its seconds;
  includes the round-0 evaluation of the initial model).

`--with-limit` also runs `../shared/bench/limit_emnist.py` at `--K 1000` and `--K 80000 --tile 80`.
That loop copies the training set `tile` times as float32 (about 15 GB at tile 80) and keeps each
client's indices as Python lists, so it is skipped when the machine lacks the memory; its min
client size is set to the engine's (`default_min_size`), since 10 is never met by 80,000 clients.

Output: a Markdown table with the K=80k / K=1k ratios (stdout) and, with `--json`, every figure.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, W_EMNIST

DEFAULT_LIMIT = REPO.parent / "shared" / "bench" / "limit_emnist.py"
CONFIGS = {"K=1k": (1000, 1), "K=80k": (80_000, 80)}
SEED = 0


def peak_rss_now(pid: int) -> float:
    """A running process's peak resident memory so far (VmHWM), MiB; NaN when it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            return next(int(line.split()[1]) / 1024 for line in handle if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return float("nan")


def wait_child(cmd: list[str], env: dict[str, str], mark: str | None = None) -> tuple[int, float, list, float, float]:
    """Runs `cmd`, timestamping each stderr line.

    Returns:
        (exit code, peak RSS MiB, [(seconds, line)], wall seconds, peak RSS MiB when the first line
        starting with `mark` arrived).
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, bufsize=1)
    lines, rss_at_mark = [], float("nan")
    for line in proc.stderr:
        lines.append((time.perf_counter() - start, line.rstrip("\n")))
        if mark is not None and rss_at_mark != rss_at_mark and line.startswith(mark):
            rss_at_mark = peak_rss_now(proc.pid)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (ru_maxrss in KiB on Linux)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024, lines, time.perf_counter() - start, rss_at_mark


def partition_examples(num_clients: int, tile: int, rounds: int, clients_per_round: int = 30) -> list[float]:
    """Training examples of rounds 1..rounds, from the partition and the sampler (when metrics.csv lacks them)."""
    from fl_lightning.data import resolve_data_dir
    from fl_lightning.sampling import sample_clients
    from fl_lightning.tasks import get_task_class

    settings = get_task_class("emnist").make_settings(resolve_data_dir(None), num_clients=num_clients, seed=SEED,
                                                      source="mnist", partition="dirichlet", alpha=0.5, tile=tile)
    sizes = get_task_class("emnist")(settings).build_data().partition.sizes()
    return [float(sizes[sample_clients(SEED, r, num_clients, clients_per_round)].sum()) for r in range(1, rounds + 1)]


def run_engine(num_clients: int, tile: int, rounds: int, extra: list[str]) -> dict:
    """One fit child of `rounds` rounds; figures of rounds 2..rounds (round 1 is the warm-up)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "fl_lightning", "fit", *W_EMNIST, "--fl.num_clients", str(num_clients),
               "--data.tile", str(tile), "--fl.eval_every", "1", "--fl.rounds", str(rounds), "--seed", str(SEED),
               "--out_dir", tmp, "--name", "run", "--fl.checkpoint_every", "0", "--log.logger", "csv",
               "--log.progress_bar", "true", *extra]
        env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
        code, maxrss, lines, wall, rss_ready = wait_child(cmd, env, mark="run directory:")
        if code != 0:
            raise RuntimeError(f"fit K={num_clients} tile={tile} failed ({code}):\n" +
                               "\n".join(line for _, line in lines[-40:]))
        with open(Path(tmp) / "run" / "metrics.csv", newline="") as handle:
            rows = [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(handle)
                    if int(r["round"]) >= 1]
    data_ready = next((t for t, line in lines if line.startswith("run directory:")), float("nan"))
    round1_end = next((t for t, line in lines if line.startswith(f"round 1/{rounds}")), float("nan"))
    examples = ([r["train_examples"] for r in rows] if all("train_examples" in r for r in rows)
                else partition_examples(num_clients, tile, rounds))
    measured = list(range(1, len(rows)))  # drop round 1
    seconds = [rows[i]["seconds"] for i in measured]
    evals = [rows[i].get("eval_seconds") for i in measured]
    train_seconds = [s - e for s, e in zip(seconds, evals, strict=True)] if None not in evals else None
    return {
        "seconds": seconds, "examples": [examples[i] for i in measured],
        "s_per_1k_examples": [1000 * s / examples[i] for s, i in zip(seconds, measured, strict=True)],
        "train_s_per_1k_examples": None if train_seconds is None else
        [1000 * s / examples[i] for s, i in zip(train_seconds, measured, strict=True)],
        "eval_seconds": evals, "maxrss_mib": maxrss, "rss_data_ready_mib": rss_ready, "setup_data_ready_s": data_ready,
        "setup_to_round1_s": round1_end - rows[0]["seconds"], "wall_s": wall, "final_main_acc": rows[-1]["main_acc"],
    }


def limit_memory_gib(tile: int) -> float:
    """What limit_emnist.py holds for its tiled training set: 60k x 784 uint8 and float32 copies, tile times."""
    return 60_000 * tile * 784 * (1 + 4) / 2**30 + 0.5


def available_gib() -> float:
    with open("/proc/meminfo") as handle:
        fields = dict(line.split(":", 1) for line in handle)
    return int(fields["MemAvailable"].split()[0]) / 2**20


def run_limit(limit: Path, num_clients: int, tile: int, rounds: int, threads: int) -> dict | None:
    """The bare loop at (K, tile), with the engine's min client size; None when memory is short."""
    from fl_lightning.tasks.partition import default_min_size

    need, have = limit_memory_gib(tile), available_gib()
    if need > 0.8 * have:
        print(f"skipping limit_emnist.py --K {num_clients} --tile {tile}: it needs about {need:.0f} GiB "
              f"(the tiled float32 copy), {have:.0f} GiB available", file=sys.stderr)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "limit.json"
        cmd = [sys.executable, str(limit), "--K", str(num_clients), "--tile", str(tile), "--rounds", str(rounds - 1),
               "--warmup", "1", "--threads", str(threads), "--malloc-tune", "--json", str(out),
               "--min-size", str(default_min_size(60_000 * tile, num_clients))]
        start = time.perf_counter()
        code, maxrss, lines, wall, _ = wait_child(cmd, {**os.environ})
        if code != 0:
            raise RuntimeError(f"limit K={num_clients} failed:\n" + "\n".join(line for _, line in lines[-40:]))
        summary = json.loads(out.read_text())
    measured = [r for r in summary["rounds"] if not r["warmup"]]
    return {"seconds": [r["sec"] for r in measured], "examples": [r["samples"] for r in measured],
            "s_per_1k_examples": [1000 * r["sec"] / r["samples"] for r in measured],
            "train_s_per_1k_examples": [1000 * (r["sec"] - r["eval"]) / r["samples"] for r in measured],
            "maxrss_mib": maxrss, "setup_data_ready_s": summary["load_sec"] + summary["partition_sec"],
            "partition_draws": summary["partition_draws"], "wall_s": time.perf_counter() - start}


def median(values: list[float | None]) -> float:
    values = [v for v in values if v is not None and v == v]  # drop missing and NaN
    return statistics.median(values) if values else float("nan")


def summarise(runs: list[dict]) -> dict[str, float]:
    """Medians: per-round figures pooled over the repeats' measured rounds, per-run figures over runs."""
    pooled = {key: [v for run in runs for v in (run.get(key) or [])]
              for key in ("seconds", "s_per_1k_examples", "train_s_per_1k_examples", "examples")}
    out = {"s_per_round": median(pooled["seconds"]), "s_per_1k_examples": median(pooled["s_per_1k_examples"]),
           "train_s_per_1k_examples": median(pooled["train_s_per_1k_examples"]),
           "examples_per_round": median(pooled["examples"]),
           "peak_rss_mib": median([run["maxrss_mib"] for run in runs]),
           "rss_data_ready_mib": median([run.get("rss_data_ready_mib") for run in runs]),
           "setup_data_ready_s": median([run.get("setup_data_ready_s") for run in runs]),
           "setup_to_round1_s": median([run.get("setup_to_round1_s") for run in runs])}
    return out


ROWS = [("s/round", "s_per_round", "{:.3f}"), ("s per 1000 examples", "s_per_1k_examples", "{:.3f}"),
        ("train s per 1000 examples (no eval)", "train_s_per_1k_examples", "{:.3f}"),
        ("examples/round", "examples_per_round", "{:.0f}"), ("peak RSS (MiB)", "peak_rss_mib", "{:.0f}"),
        ("peak RSS when the data is ready (MiB)", "rss_data_ready_mib", "{:.0f}"),
        ("setup: start to data ready (s)", "setup_data_ready_s", "{:.2f}"),
        ("setup: start to round 1 (s)", "setup_to_round1_s", "{:.2f}")]


def table(title: str, small: dict[str, float], large: dict[str, float]) -> str:
    lines = [f"**{title}**", "", "| | K=1,000 (tile 1) | K=80,000 (tile 80) | 80k / 1k |", "|---|---:|---:|---:|"]
    for label, key, fmt in ROWS:
        a, b = small.get(key, float("nan")), large.get(key, float("nan"))
        if a != a and b != b:  # both NaN: not measured
            continue
        ratio = f"{b / a:.3f}" if a == a and b == b and a else "n/a"
        lines.append(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="rounds per run; the first is a warm-up and dropped")
    parser.add_argument("--repeats", type=int, default=2, help="alternating passes over the two configurations")
    parser.add_argument("--engine-args", default="", help="extra arguments for every fit child (space-separated)")
    parser.add_argument("--with-limit", action="store_true", help="also run limit_emnist.py at both K")
    parser.add_argument("--limit", type=Path, default=DEFAULT_LIMIT, help="path of limit_emnist.py")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="threads of the bare loop")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be >= 2 (the first round is dropped)")

    extra = args.engine_args.split()
    results: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    limits: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    load = [os.getloadavg()[0]]
    for repeat in range(args.repeats):
        names = list(CONFIGS) if repeat % 2 == 0 else list(reversed(CONFIGS))  # 1k, 80k, 80k, 1k, ...
        for name in names:
            num_clients, tile = CONFIGS[name]
            run = run_engine(num_clients, tile, args.rounds, extra)
            results[name].append(run)
            print(f"[{repeat}] engine {name}: {median(run['seconds']):.3f} s/round, "
                  f"{median(run['s_per_1k_examples']):.3f} s/1000 examples, {run['maxrss_mib']:.0f} MiB, "
                  f"setup {run['setup_data_ready_s']:.2f} s", file=sys.stderr, flush=True)
            if args.with_limit:
                limit_run = run_limit(args.limit, num_clients, tile, args.rounds, args.threads)
                if limit_run is not None:
                    limits[name].append(limit_run)
            load.append(os.getloadavg()[0])

    engine = {name: summarise(runs) for name, runs in results.items()}
    out = [f"W-EMNIST, {args.rounds} rounds per run (first dropped), {args.repeats} repeat(s); "
           f"{platform.node()}, {len(os.sched_getaffinity(0))} cores, load average {min(load):.1f} to {max(load):.1f}",
           "", table("fl_lightning", engine["K=1k"], engine["K=80k"])]
    limit_summary = {name: summarise(runs) for name, runs in limits.items() if runs}
    if len(limit_summary) == 2:
        out += ["", table("limit_emnist.py (bare loop)", limit_summary["K=1k"], limit_summary["K=80k"])]
    elif args.with_limit:
        out += ["", "limit_emnist.py: not run at both K (see the messages above)."]
    print("\n".join(out))
    if args.json is not None:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "configs": CONFIGS,
                                         "engine": {"summary": engine, "runs": results},
                                         "limit": {"summary": limit_summary, "runs": limits},
                                         "load_average": load}, indent=1))


if __name__ == "__main__":
    main()
