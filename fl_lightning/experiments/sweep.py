"""Runs a W&B sweep file locally, without a W&B server: `python -m fl_lightning sweep sweeps/X.yaml`.

The paper's experiments (Wang et al., "Attack of the Tails: Yes, You Really Can Backdoor Federated
Learning", NeurIPS 2020, arXiv:2007.05084) are W&B sweep files in `sweeps/`, one per question. The
same file works with `wandb sweep` + `wandb agent` and with this runner, which

* expands the `grid` and `random` methods itself (random draws are seeded by `--sample_seed`;
  `bayes` needs the W&B server);
* builds each run's argv from the file's `command` exactly as `wandb agent` does (`${env}`,
  `${interpreter}`, `${program}`, `${args}` -> `--key=value` with Python's `str` of the value,
  `${args_no_hyphens}`, `${args_json}`, `${envvar:NAME}`), except that `${interpreter}` is this
  Python, so the runs use this environment;
* parses every run's arguments in this process as `fit` parses them (`check_runs`), so a bad value
  stops the sweep with one line before anything is written or started;
* names every run after its parameters (readable values plus a hash of the whole command), writes it
  to `<out_dir>/<sweep name>/<run name>/`, and on a second start skips the runs that finished (they
  have `model.safetensors`) and resumes those that stopped after a checkpoint;
* writes `index.jsonl` and `index.csv` (one row per run: name, status, parameters) into the sweep
  directory, which `python -m fl_lightning report` reads.

Each run logs as usual (W&B online with credentials, offline otherwise; `metrics.csv` always). The
old `sweeps` package of W&B is not used (it pins numpy below 2).
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fl_lightning.checkpoint import CHECKPOINT_NAME, MODEL_NAME
from fl_lightning.cli import check_fit_args
from fl_lightning.config import ConfigError, check_int, raise_problems
from fl_lightning.data import DataError

INDEX_JSONL, INDEX_CSV = "index.jsonl", "index.csv"
# `wandb agent`'s command when the file has none (wandb_agent.py, DEFAULT_SWEEP_COMMAND).
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]
DISTRIBUTIONS = ("constant", "categorical", "int_uniform", "uniform", "q_uniform", "log_uniform",
                 "log_uniform_values", "q_log_uniform_values", "inv_log_uniform_values", "normal", "q_normal",
                 "log_normal")
_ENVVAR = re.compile(r"\$\{envvar:([A-Za-z0-9_]*)\}")


@dataclass
class SweepFile:
    """A parsed and checked sweep file, with `--set` overrides applied to its parameters."""

    path: Path
    name: str
    method: str
    program: str
    command: list[str]
    parameters: dict[str, dict[str, Any]]
    run_cap: int | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def swept_keys(self) -> list[str]:
        """Parameters that take more than one value: the keys a report groups and labels runs by."""
        return [key for key, spec in self.parameters.items() if len(candidates(spec)) != 1]


@dataclass
class PlannedRun:
    """One configuration of a sweep: its parameters, its argv, and where it writes."""

    name: str
    params: dict[str, Any]
    argv: list[str]
    run_dir: Path

    def status(self) -> str:
        """`done` (a final model exists), `partial` (a checkpoint exists) or `new`."""
        if (self.run_dir / MODEL_NAME).is_file():
            return "done"
        return "partial" if (self.run_dir / CHECKPOINT_NAME).is_file() else "new"


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> SweepFile:
    """Reads a sweep file and checks what this runner and `wandb sweep` both need.

    Args:
        path: The sweep YAML.
        overrides: `key=value` strings (YAML values): each fixes a parameter to one value in every
            run, replacing its values in the file, or adds it when the file does not sweep it.

    Raises:
        ConfigError: A missing key, an unknown method or distribution, or a malformed parameter.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {str(path)!r} does not exist")
    with open(path) as handle:
        raw = yaml.safe_load(handle)
    where = f"sweep file {path}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping with program, method and parameters")
    missing = [key for key in ("program", "method", "parameters") if key not in raw]
    if missing:
        raise ConfigError(f"{where} lacks {', '.join(missing)} (W&B requires program, method and parameters)")
    if raw["method"] not in ("grid", "random", "bayes"):
        raise ConfigError(f"{where}: method {raw['method']!r} is not one of grid, random, bayes")
    command = [str(part) for part in raw.get("command", DEFAULT_COMMAND)]
    if "${args}" not in command:
        raise ConfigError(f"{where}: its command has no ${{args}}, so the swept parameters would never reach the run")
    parameters = dict(raw["parameters"] or {})
    for key, value in parse_overrides(overrides or []).items():
        parameters[key] = {"value": value}
    for key, spec in parameters.items():
        check_parameter(f"{where}: parameter {key!r}", spec, raw["method"])
    run_cap = raw.get("run_cap")
    return SweepFile(path=path, name=str(raw.get("name") or path.stem), method=raw["method"],
                     program=str(raw["program"]), command=command, parameters=parameters,
                     run_cap=int(run_cap) if run_cap is not None else None, raw=raw)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["fl.rounds=3", "aggregator=Krum"]` -> `{"fl.rounds": 3, "aggregator": "Krum"}` (values read as YAML)."""
    parsed = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r} is not key=value (e.g. --set fl.rounds=3)")
        parsed[key.strip().removeprefix("--")] = yaml.safe_load(value) if value.strip() else ""
    return parsed


def check_parameter(where: str, spec: Any, method: str) -> None:
    """A parameter is `{value: x}`, `{values: [...]}` or `{distribution: ..., min, max, ...}`."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be a mapping such as {{value: 1}} or {{values: [1, 2]}}, got {spec!r}")
    if "parameters" in spec:
        raise ConfigError(f"{where}: nested parameters are not supported; use dotted keys (fl.rounds)")
    distribution = spec.get("distribution", infer_distribution(spec))
    if distribution is None:
        raise ConfigError(f"{where} needs value, values, or distribution with min and max")
    if distribution not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: distribution {distribution!r} is not one of {', '.join(DISTRIBUTIONS)}")
    if "values" in spec and (not isinstance(spec["values"], list) or not spec["values"]):
        raise ConfigError(f"{where}: values must be a non-empty list")
    # The normal family defaults to mu 0, sigma 1, as in W&B; every other continuous one needs bounds.
    needs = {"constant": ("value",), "categorical": ("values",), "normal": (), "q_normal": (),
             "log_normal": ()}.get(distribution, ("min", "max"))
    absent = [key for key in needs if key not in spec]
    if absent:
        raise ConfigError(f"{where}: distribution {distribution} needs {', '.join(absent)}")
    if method == "grid" and distribution not in ("constant", "categorical", "int_uniform"):
        raise ConfigError(f"{where}: a grid needs value, values or int_uniform, not {distribution}")


def infer_distribution(spec: dict[str, Any]) -> str | None:
    """W&B's defaults: `value` -> constant, `values` -> categorical, int min/max -> int_uniform, else uniform."""
    if "value" in spec:
        return "constant"
    if "values" in spec:
        return "categorical"
    if "min" in spec and "max" in spec:
        both_int = all(isinstance(spec[k], int) and not isinstance(spec[k], bool) for k in ("min", "max"))
        return "int_uniform" if both_int else "uniform"
    return None


def candidates(spec: dict[str, Any]) -> list[Any]:
    """The finite values a parameter takes in a grid; a continuous distribution gives `[]` (many)."""
    distribution = spec.get("distribution", infer_distribution(spec))
    if distribution == "constant":
        return [spec["value"]]
    if distribution == "categorical":
        return list(spec["values"])
    if distribution == "int_uniform":
        return list(range(int(spec["min"]), int(spec["max"]) + 1))
    return []


def grid_configs(parameters: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every combination, the first parameter varying slowest (the order `wandb sweep` enumerates)."""
    keys = list(parameters)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(candidates(parameters[k]) for k in keys))]


def random_configs(parameters: dict[str, dict[str, Any]], count: int, seed: int) -> list[dict[str, Any]]:
    """`count` draws, parameter by parameter in file order, from one generator seeded by `seed`.

    Duplicate draws (likely with few categorical values) are kept once, so fewer may come back.
    """
    rng = np.random.default_rng(seed)
    configs, seen = [], set()
    for _ in range(count):
        config = {key: sample_value(spec, rng) for key, spec in parameters.items()}
        fingerprint = json.dumps(config, sort_keys=True, default=str)
        if fingerprint not in seen:
            seen.add(fingerprint)
            configs.append(config)
    return configs


def sample_value(spec: dict[str, Any], rng: np.random.Generator) -> Any:
    """One draw from a parameter's distribution, with W&B's meaning of each distribution name."""
    distribution = spec.get("distribution", infer_distribution(spec))
    if distribution in ("constant", "categorical", "int_uniform"):
        values = candidates(spec)
        return values[int(rng.integers(len(values)))]
    low, high = spec.get("min"), spec.get("max")
    if distribution == "uniform":
        return float(rng.uniform(low, high))
    if distribution == "q_uniform":
        return quantize(float(rng.uniform(low, high)), spec.get("q", 1.0))
    if distribution == "log_uniform":  # min and max are natural-log exponents
        return float(math.exp(rng.uniform(low, high)))
    if distribution == "log_uniform_values":
        return float(math.exp(rng.uniform(math.log(low), math.log(high))))
    if distribution == "q_log_uniform_values":
        return quantize(float(math.exp(rng.uniform(math.log(low), math.log(high)))), spec.get("q", 1.0))
    if distribution == "inv_log_uniform_values":
        return float(1.0 / math.exp(rng.uniform(math.log(1.0 / high), math.log(1.0 / low))))
    mu, sigma = spec.get("mu", 0.0), spec.get("sigma", 1.0)
    if distribution == "normal":
        return float(rng.normal(mu, sigma))
    if distribution == "q_normal":
        return quantize(float(rng.normal(mu, sigma)), spec.get("q", 1.0))
    return float(math.exp(rng.normal(mu, sigma)))  # log_normal


def quantize(value: float, q: float) -> float | int:
    """W&B's `q_*` distributions round to a multiple of q; an integer q gives an int."""
    rounded = round(value / q) * q
    return int(rounded) if float(q).is_integer() else float(rounded)


def expand(sweep_file: SweepFile, max_runs: int | None = None, sample_seed: int = 0) -> list[dict[str, Any]]:
    """The sweep's configurations, at most `max_runs` (and the file's `run_cap`), in a fixed order.

    Raises:
        ConfigError: `bayes` (it needs the W&B server) or a random sweep with no cap.
    """
    caps = [cap for cap in (max_runs, sweep_file.run_cap) if cap is not None]
    cap = min(caps) if caps else None
    if sweep_file.method == "bayes":
        raise ConfigError(f"{sweep_file.path}: method bayes needs the W&B server (wandb sweep + wandb agent); "
                          "use method random or grid to run it locally")
    if sweep_file.method == "random":
        if cap is None:
            raise ConfigError(f"{sweep_file.path}: a random sweep never ends by itself; give --max_runs N "
                              "(or run_cap in the file)")
        return random_configs(sweep_file.parameters, cap, sample_seed)
    configs = grid_configs(sweep_file.parameters)
    return configs[:cap] if cap is not None else configs


def format_args(params: dict[str, Any]) -> list[str]:
    """`${args}` as `wandb agent` writes it: `--key=value`, value as Python's `str` (repr inside lists and dicts).

    jsonargparse reads those values as YAML, which also accepts Python's `True` and quoted dict keys.
    """
    return [f"--{key}={value}" for key, value in params.items()]


def build_argv(command: list[str], program: str, params: dict[str, Any]) -> list[str]:
    """The run's argv: the command with its macros expanded as `wandb agent` does."""
    macros = {
        "${env}": ["/usr/bin/env"] if os.name == "posix" and Path("/usr/bin/env").exists() else [],
        "${interpreter}": [sys.executable],  # the agent says `python`; this environment's Python is safer
        "${program}": [program],
        "${args}": format_args(params),
        "${args_no_hyphens}": [f"{key}={value}" for key, value in params.items()],
        "${args_no_boolean_flags}": [f"--{k}" if v is True else f"--{k}={v}" for k, v in params.items()
                                     if v is not False],
        "${args_json}": [json.dumps(params)],
    }
    argv: list[str] = []
    for part in command:
        if part in macros:
            argv += macros[part]
        else:
            argv.append(_ENVVAR.sub(lambda m: os.environ.get(m.group(1), m.group(1)), part))
    return argv


def slug(value: Any) -> str:
    """A short, path-safe rendering of a parameter value for run names (`Krum`, `pgd-1.0-true`)."""
    if isinstance(value, dict):
        parts = [value["class_path"].rsplit(".", 1)[-1]] if "class_path" in value else []
        inner = value.get("init_args", {}) if "class_path" in value else value
        parts += [slug(v) for v in (inner or {}).values()]
        text = "-".join(parts)
    elif isinstance(value, (list, tuple)):
        text = "-".join(slug(v) for v in value)
    else:
        text = short_class_name(value) if isinstance(value, str) else str(value)
    return re.sub(r"[^A-Za-z0-9.=+-]+", "", text.replace(" ", ""))


def short_class_name(text: str) -> str:
    """`fl_lightning.callbacks.Krum` -> `Krum`; any other string (`lenet_w0.5`, `0.5`) unchanged."""
    head, _, last = text.rpartition(".")
    return last if head and last[:1].isupper() and not head[:1].isdigit() else text


def run_name(params: dict[str, Any], swept_keys: list[str], command: list[str], program: str) -> str:
    """`<swept values>-<hash>`: readable, and the same for the same command and parameters only.

    The hash covers the command template and every parameter value (not the interpreter's path), so
    changing a fixed setting makes new runs instead of skipping old ones that no longer match.
    """
    key = json.dumps({"command": command, "program": program, "params": params}, sort_keys=True, default=str)
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    readable = "_".join(slug(params[k]) for k in swept_keys if k in params)[:80].strip("_-.")
    return f"{readable}-{digest}" if readable else f"run-{digest}"


def plan_runs(sweep_file: SweepFile, configs: list[dict[str, Any]], sweep_dir: Path,
              log_group: bool = True) -> list[PlannedRun]:
    """Names each configuration and appends `--out_dir/--name` (and a W&B group) to its argv."""
    swept, runs = sweep_file.swept_keys, []
    for params in configs:
        name = run_name(params, swept, sweep_file.command, sweep_file.program)
        argv = build_argv(sweep_file.command, sweep_file.program, params)
        extra = [f"--out_dir={sweep_dir}", f"--name={name}"]
        if log_group and "log.group" not in params:
            extra.append(f"--log.group={sweep_file.name}")
        runs.append(PlannedRun(name=name, params=params, argv=argv + extra, run_dir=sweep_dir / name))
    return runs


def resume_argv(run: PlannedRun) -> list[str]:
    """`... fit --resume DIR`: the saved config.yaml holds everything else (fit loads it first).

    Repeating the sweep's arguments would append a second attack through `--callbacks+=`.
    """
    if "fit" not in run.argv:
        raise ConfigError(f"cannot resume {run.run_dir}: its command has no `fit`")
    return run.argv[:run.argv.index("fit") + 1] + [f"--resume={run.run_dir}"]


def fit_args(argv: list[str]) -> list[str] | None:
    """The arguments after `fit` when `argv` runs this package's `fit`; None for another program.

    This package is `-m fl_lightning`, its `__main__.py` or the `fl-lightning` script.
    """
    if "fit" not in argv:
        return None
    at = argv.index("fit")
    ours = any(Path(part).name in ("fl_lightning", "fl-lightning") or part.endswith("fl_lightning/__main__.py")
               for part in argv[:at])
    return argv[at + 1:] if ours else None


def check_runs(runs: list[PlannedRun], settings: bool = True) -> None:
    """Checks the `fit` arguments of every run still to do (parse, build, validate), before any starts.

    `settings=False` only parses and builds (`check_fit_args`), for runs that start from a model not yet trained.

    Raises:
        ConfigError: At the first bad run, naming it, the option and what is allowed.
    """
    for run in runs:
        status = run.status()
        args = None if status == "done" else fit_args(resume_argv(run) if status == "partial" else run.argv)
        if args is None:
            continue
        try:
            check_fit_args(args, settings)
        except (ConfigError, DataError) as err:
            raise ConfigError(f"run {run.name}: {err}") from None


def write_index(sweep_dir: Path, sweep_file: SweepFile, rows: list[dict[str, Any]]) -> None:
    """`index.jsonl` (full records) and `index.csv` (one column per parameter), each replaced atomically."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({**row, "sweep": sweep_file.name, "swept_keys": sweep_file.swept_keys},
                               default=str) + "\n" for row in rows)
    _write_atomic(sweep_dir / INDEX_JSONL, lines)
    keys = list(dict.fromkeys(k for row in rows for k in row["params"]))
    partial = sweep_dir / (INDEX_CSV + ".tmp")
    with open(partial, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "status", "returncode", "seconds", *keys])
        for row in rows:
            values = [row["params"].get(k, "") for k in keys]
            writer.writerow([row["name"], row["status"], row.get("returncode", ""), row.get("seconds", ""),
                             *(json.dumps(v) if isinstance(v, (dict, list)) else v for v in values)])
    os.replace(partial, sweep_dir / INDEX_CSV)


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(text)
    os.replace(partial, path)


def read_index(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a sweep directory's `index.jsonl`."""
    with open(Path(sweep_dir) / INDEX_JSONL) as handle:
        return [json.loads(line) for line in handle if line.strip()]


class Worker:
    """The parent's handle on one worker process (`python -m fl_lightning.experiments.worker`), started on first use
    and again after it died."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None

    @staticmethod
    def takes(args: list[str]) -> bool:
        """Whether a worker can run these `fit` arguments (one process, so not `--devices`/`--num_nodes` > 1)."""
        for i, arg in enumerate(args):
            key, sep, value = arg.partition("=")
            if key in ("--devices", "--num_nodes"):
                value = value if sep else (args[i + 1] if i + 1 < len(args) else "1")
                if value.strip() != "1":
                    return False
        return True

    def run(self, args: list[str], log: Path) -> int:
        """Runs `python -m fl_lightning ARGS` in the worker; its exit status (a dead worker's, if it died)."""
        if self.process is None or self.process.poll() is not None:
            self.process = subprocess.Popen([sys.executable, "-m", "fl_lightning.experiments.worker"],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"args": args, "log": str(log)}) + "\n")
        self.process.stdin.flush()
        reply = self.process.stdout.readline()
        if not reply:  # it died mid-run (killed, out of memory, a crash)
            return self.process.wait() or 1
        return int(json.loads(reply)["returncode"])

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            self.process.wait()


def execute(run: PlannedRun, num_threads: int | None = None, worker: Worker | None = None) -> dict[str, Any]:
    """Runs (or resumes) one planned run as a subprocess, or in `worker`; its output goes to `<run dir>/run.log`.

    Returns:
        `status` (`done` when it exited 0 with a final model, else `failed`), `returncode`, `seconds`.
    """
    argv = resume_argv(run) if run.status() == "partial" else list(run.argv)
    if num_threads is not None and "num_threads" not in run.params:
        argv.append(f"--num_threads={num_threads}")  # parallel runs must not each take every core
    run.run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(run.run_dir / "run.log", "a") as log:  # the run's own output, kept beside its results
        log.write(f"$ {' '.join(argv)}\n")
        log.flush()
        args = fit_args(argv)
        if worker is not None and args is not None and Worker.takes(args):
            returncode = worker.run(["fit", *args], run.run_dir / "run.log")
        else:
            returncode = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL).returncode
    return {"status": "done" if returncode == 0 and run.status() == "done" else "failed",
            "returncode": returncode, "seconds": round(time.perf_counter() - started, 1)}


def execute_all(runs: list[PlannedRun], rows: list[dict[str, Any]], jobs: int = 1,
                on_change: Callable[[], None] = lambda: None, say: Callable[[str], None] = print,
                reuse_processes: bool = False) -> None:
    """Runs every unfinished run, `jobs` at a time, updating its row and calling `on_change` after each.

    With `reuse_processes`, each of the `jobs` lanes runs its `fit` commands in one long-lived worker
    process (`worker.py`), which imports torch and Lightning once instead of once per run.
    """
    todo = [(run, row) for run, row in zip(runs, rows) if run.status() != "done"]
    for run, row in zip(runs, rows):
        if run.status() == "done":
            row["status"] = "done"
    say(f"{len(runs) - len(todo)} finished before (skipped), {len(todo)} to run"
        + (f", {jobs} at a time" if jobs > 1 and todo else ""))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // jobs) if jobs > 1 else None
    lanes, workers = threading.local(), []

    def lane_worker() -> Worker | None:
        if reuse_processes and not hasattr(lanes, "worker"):
            lanes.worker = Worker()
            workers.append(lanes.worker)
        return getattr(lanes, "worker", None)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(lambda r: execute(r, threads, lane_worker()), run): (run, row) for run, row in todo}
        for done, future in enumerate(as_completed(futures), start=1):
            run, row = futures[future]
            row.update(future.result())
            on_change()  # only this thread writes the index
            say(f"[{done}/{len(todo)}] {run.name}: {row['status']} in {row['seconds']:.0f} s"
                + ("" if row["status"] == "done" else f" (exit {row['returncode']}; see {run.run_dir / 'run.log'})"))
    for worker in workers:
        worker.close()


def run_sweep(file: str | Path, max_runs: int | None = None, overrides: list[str] | None = None,
              out_dir: str | Path = "runs", sample_seed: int = 0, jobs: int = 1, dry_run: bool = False,
              quiet: bool = False) -> tuple[Path, list[dict[str, Any]]]:
    """Runs (or plans, with `dry_run`) every configuration of a sweep file; the library form of `sweep`.

    Every run's `fit` arguments are checked (`check_runs`) before anything is written or started.

    Raises:
        ConfigError: A bad sweep file, or the first run whose arguments `fit` would refuse.

    Returns:
        The sweep directory and its index rows (status `done`, `failed` or, in a dry run, `planned`).
    """
    sweep_file = load_sweep(file, overrides)
    sweep_dir = Path(out_dir) / sweep_file.name
    runs = plan_runs(sweep_file, expand(sweep_file, max_runs, sample_seed), sweep_dir)
    check_runs(runs)
    say = (lambda text: None) if quiet else (lambda text: print(text, file=sys.stderr, flush=True))
    say(f"sweep {sweep_file.name}: {len(runs)} run(s) ({sweep_file.method}) in {sweep_dir}")
    rows = [{"name": r.name, "status": "done" if r.status() == "done" else "planned", "params": r.params,
             "argv": r.argv, "run_dir": str(r.run_dir)} for r in runs]
    if dry_run:
        for row in rows:
            say(f"  {row['status']:7s} {row['name']}: {' '.join(row['argv'])}")
        return sweep_dir, rows
    write_index(sweep_dir, sweep_file, rows)
    execute_all(runs, rows, jobs, lambda: write_index(sweep_dir, sweep_file, rows), say)
    return sweep_dir, rows


def sweep(file: str, *, max_runs: int | None = None, overrides: list[str] | None = None, out_dir: str = "runs",
          sample_seed: int = 0, jobs: int = 1, dry_run: bool = False) -> None:
    """Runs a W&B sweep file locally, one `fit` subprocess per configuration; finished runs are skipped.

    Args:
        file: The sweep YAML (e.g. `sweeps/emnist_defenses.yaml`).
        max_runs: Run at most this many configurations (the first of the grid, or this many random draws).
        overrides: `key=value` fixed in every run, replacing the file's values for that key; on the
            command line `--set`, once per key (e.g. `--set fl.rounds=3 --set data.source=mnist`).
        out_dir: Runs go to `<out_dir>/<sweep name>/<run name>/`, with `index.jsonl` and `index.csv`.
        sample_seed: Seed of the random method's draws (the runs' own seed is the `seed` parameter).
        jobs: Runs at a time; each then gets `--num_threads` = cores / jobs unless the sweep sets it.
        dry_run: Print each run's command and status without running anything.
    """
    raise_problems([check_int("--max_runs", max_runs, minimum=1), check_int("--jobs", jobs, minimum=1)])
    _, rows = run_sweep(file, max_runs, overrides, out_dir, sample_seed, jobs, dry_run)
    failed = [row["name"] for row in rows if row["status"] == "failed"]
    if failed:
        print(f"error: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        raise SystemExit(1)
