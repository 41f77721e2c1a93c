"""The modern-defenses table: `python -m fl_lightning defenses [--preset small] [--out_dir DIR] [--jobs N]`.

Edge-case attacks (Wang et al., NeurIPS 2020) against the defenses published since (Bulyan, FLAME,
FoolsGold, FLTrust, RobustLR, DeepSight, FLDetector, CRFL, LocalDP), with FedAvg as the undefended
row. Each defense meets three attacks, each judged against a control (the same run, same seed, start
and aggregator, without the attacker):

* black-box data poisoning;
* PGD with its radius from the honest norm the attacker measures itself (factor 1.0, as in the claims
  check's undefended rows);
* PGD with model replacement: projected onto 0.1 × that norm, then scaled up by the replacement
  factor (about 14 at m = 10), so the sent update is about 1.4 honest norms.

Setting: the claims check's (`fl_lightning.experiments.claims`): the same clean starts (reused when
they exist under `<out_dir>/starts`), the paper's client density and local training, and one seed
(the preset's first; the table is a survey, not a claim), with a longer phase: R = 6 rounds, an
attacker in rounds 1, 3 and 5, so that the rules that learn across rounds (FoolsGold's histories,
FLDetector's window, shortened to 2 rounds for it) have rounds to learn in. Printed per task, and
written to `<out_dir>/defenses.md`:

* **lift**: backdoor accuracy over the control, mean over rounds 1..R, in points;
* **main**: the control's main-task accuracy at round R, %;
* **TPR / FPR**: the share of attacker / honest updates the defense flagged or excluded, mean over the
  attacked rounds (`-`: the rule flags nothing, as FedAvg, RobustLR, CRFL and LocalDP);
* **s/round**: the control's mean seconds per round (training, aggregation and evaluation).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from fl_lightning.config import check_int, raise_problems
from fl_lightning.experiments.claims import PRESETS, Plan, check_starts, execute, lift, planned
from fl_lightning.experiments.report import read_metrics
from fl_lightning.experiments.sweep import PlannedRun, check_runs, parse_overrides

# Each defense's `fit` overrides: its aggregator and any client-side callback, at its paper's defaults.
MODERN: dict[str, dict[str, Any]] = {
    "FedAvg": {"aggregator": "FedAvg"},
    "Bulyan": {"aggregator": {"class_path": "Bulyan", "init_args": {"num_adversaries": 1}}},
    "FLAME": {"aggregator": "FLAME"},
    "FoolsGold": {"aggregator": "FoolsGold"},
    "FLTrust": {"aggregator": "FLTrust"},
    "RobustLR": {"aggregator": "RobustLR"},
    # 500 random inputs and one seed instead of the paper's 20,000 and 3: the paper's DDifs cost about an
    # hour a round on 2 CPU cores (1.9M forward passes of 31 models); say so beside its row.
    "DeepSight": {"aggregator": {"class_path": "DeepSight", "init_args": {"num_samples": 500, "num_seeds": 1}}},
    # A window of 2 rounds instead of the paper's 10, so that it detects from round 4 of the 6.
    "FLDetector": {"aggregator": {"class_path": "FLDetector", "init_args": {"window": 2}}},
    "CRFL": {"aggregator": "CRFL"},
    "LocalDP": {"aggregator": "FedAvg", "callbacks": [{"class_path": "LocalDP"}]},
}
# CRFL's bound schedule (min(15, 2 + 0.1 t), the authors' MNIST one) is for training from scratch: it would
# shrink a converged start to norm 2.1 in round 1. Attacking a converged model, the bound is held just above
# the clean start's norm (emnist 14.4, sentiment140 2098), so it binds only if the model grows.
TASK_ARGS: dict[tuple[str, str], dict[str, Any]] = {
    ("CRFL", "emnist"): {"norm_bound": 15.0, "bound_start": 15.0, "bound_growth": 0.0},
    ("CRFL", "sentiment140"): {"norm_bound": 2100.0, "bound_start": 2100.0, "bound_growth": 0.0},
}
ATTACKS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "blackbox": {"mode": "blackbox"},
    "pgd": {"mode": "pgd", "honest_norm_factor": 1.0},
    "pgd_replacement": {"mode": "pgd", "honest_norm_factor": 0.1, "model_replacement": True},
}
ATTACK_TITLES = {"blackbox": "black-box", "pgd": "PGD", "pgd_replacement": "PGD + replacement"}


def table_run(plan: Plan, task: str, defense: str, attack: str, seed: int, rounds: int = 6,
              attack_every: int = 2) -> PlannedRun:
    """One run of the table: the claims check's attack phase on the edge case, `rounds` long, under `defense`."""
    setting = plan.settings[task]
    callbacks = list(MODERN[defense].get("callbacks", []))
    if ATTACKS[attack] is not None:
        extra = {key.removeprefix("callbacks."): value for key, value in parse_overrides(list(setting.pgd)).items()}
        init_args = {**ATTACKS[attack], **(extra if attack != "blackbox" else {}),
                     "attack_every": attack_every, "measure_attacker": False}
        callbacks.append({"class_path": "EdgeCaseAttack", "init_args": init_args})
    aggregator = MODERN[defense]["aggregator"]
    if (defense, task) in TASK_ARGS:
        aggregator = {"class_path": defense, "init_args": TASK_ARGS[defense, task]}
    aggregator = json.dumps(aggregator)
    overrides = [*plan.phase(task, setting.model, "edge", seed, rounds), f"aggregator={aggregator}"]
    if callbacks:
        overrides.append(f"callbacks={json.dumps(callbacks)}")
    return planned(plan.root / "defenses" / task / f"{defense}_{attack}_s{seed}".lower(), overrides)


def attacked_mean(metrics: pd.DataFrame, column: str) -> float:
    """The mean of a column over the attacked rounds (NaN when the column is absent or empty there)."""
    if column not in metrics or "num_adversaries" not in metrics:
        return math.nan
    attacked = metrics[metrics["num_adversaries"].fillna(0) > 0]
    return float(attacked[column].mean()) if len(attacked) else math.nan


def rate(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.0f}"


def table_lines(task: str, metrics: dict[tuple[str, str], pd.DataFrame]) -> list[str]:
    """The task's table in Markdown: one row per defense."""
    head = "| defense | main % | s/round | " + " | ".join(
        f"{title} lift | TPR / FPR %" for title in ATTACK_TITLES.values()) + " |"
    lines = [f"**{task}**", "", head, "|" + "---|" * (3 + 2 * len(ATTACK_TITLES))]
    for defense in MODERN:
        control = metrics[defense, "none"]
        cells = [defense, f"{100 * float(control['main_acc'].iloc[-1]):.1f}",
                 f"{float(control.loc[control['round'] > 0, 'seconds'].mean()):.1f}"]
        for attack in ATTACK_TITLES:
            run = metrics[defense, attack]
            cells += [f"{lift(run, control):.1f}",
                      f"{rate(attacked_mean(run, 'detection_tpr'))} / {rate(attacked_mean(run, 'detection_fpr'))}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def defenses(*, preset: Literal["small", "quick"] = "small", out_dir: str = "runs/claims", jobs: int = 2,
             rounds: int = 6, attack_every: int = 2) -> None:
    """Runs edge-case attacks against the modern defenses, each with its control, and prints the table.

    Args:
        preset: The claims preset whose setting, clean starts and first seed the table uses.
        out_dir: The claims check's directory: its clean starts are reused, the runs go under `defenses/`.
        jobs: Runs at a time (each with cores / jobs threads).
        rounds: Rounds of each run from its clean start.
        attack_every: An attacker every this many rounds, from round 1.
    """
    raise_problems([check_int("--jobs", jobs, minimum=1), check_int("--rounds", rounds, minimum=1),
                    check_int("--attack_every", attack_every, minimum=1)])
    started = time.perf_counter()
    plan = Plan(PRESETS[preset], Path(out_dir))
    seed = plan.preset.seeds[0]
    starts = [plan.start(setting.task, setting.model, "edge") for setting in plan.preset.tasks]
    keys = [(s.task, d, a) for s in plan.preset.tasks for d in MODERN for a in ATTACKS]
    runs = {key: table_run(plan, *key, seed, rounds, attack_every) for key in keys}
    check_runs(starts)
    check_runs(list(runs.values()), settings=False)
    execute(starts, jobs, plan.root / "starts" / "index.jsonl")
    check_starts(plan, starts)
    check_runs(list(runs.values()))
    execute(list(runs.values()), jobs, plan.root / "defenses" / "index.jsonl")
    lines = [f"Edge-case attacks against the modern defenses: the {preset} claims setting, seed {seed} "
             f"({rounds} rounds, an attacker every {attack_every}); lift in points over the no-attack control, "
             "mean over rounds 1..R", ""]
    for setting in plan.preset.tasks:
        metrics = {(d, a): read_metrics(runs[setting.task, d, a].run_dir) for _, d, a in keys if _ == setting.task}
        lines += [*table_lines(setting.task, metrics), ""]
    lines.append(f"(this invocation took {(time.perf_counter() - started) / 60:.1f} min)")
    text = "\n".join(lines)
    print(text)
    (plan.root / "defenses.md").write_text(text + "\n")
    print(f"written: {plan.root / 'defenses.md'}", file=sys.stderr)
