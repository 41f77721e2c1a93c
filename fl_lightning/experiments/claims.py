"""The claims check: `python -m fl_lightning claims [--preset small|quick|paper] [--out_dir DIR] [--jobs N]`.

Runs a preset and checks the four claims of Wang et al., "Attack of the Tails: Yes, You Really Can
Backdoor Federated Learning", NeurIPS 2020 (arXiv:2007.05084), printing each with its numbers and
PASS or FAIL:

1. pure edge-case attacks are stronger than not-so-edge ones (the attacker holds 100 % > 50 % > 10 %
   of the edge examples; honest clients hold the rest with their true label);
2. PGD attacks get through all the defenses (no defense, norm clipping, weak DP, Krum, Multi-Krum,
   RFA), while black-box data poisoning is weak against Krum and Multi-Krum;
3. a lower attack frequency injects the backdoor more slowly;
4. lower-capacity models resist the backdoor better but lose main-task accuracy.

Protocol of the default `small` preset (sized for a 2-core machine; `PRESETS` holds every number):

* **Clean start.** As in the paper, every attack starts from a model trained without attack, one per
  (task, model, attack case): one epoch over the whole training set held by one client (emnist:
  MNIST, SGD lr 0.01, batch 32; sentiment140: its 100k-tweet sample, the paper's lr and batch). In the
  almost-edge and normal cases the honest clients' true-labelled edge examples are part of that
  training set: that is what makes those cases "not so edge". A start below its main-accuracy
  threshold (emnist 97 %, sentiment140 68 %) stops the check with an error before any attack runs.
* **Attack phase**, R = 3 rounds from the start, one attacker in rounds 1 and 3.
  emnist: MNIST tiled 4 times over K = 3383 clients (about 71 images each: the paper's EMNIST density),
  m = 10 clients a round, the paper's local training (E = 5, B = 512, lr 0.1); the attacker holds the
  paper's set scaled by m / 30 (20 ARDIS sevens labelled "1" and 30 clean images instead of 66 and 100),
  so that its share of a FedAvg round stays the paper's (50 / 689 = 7.3 %; paper 166 / 2225 = 7.5 %).
  Main accuracy is measured on a fixed draw of 2,000 of the 10,000 test images (`--fl.eval_subset`).
  sentiment140: its 100k sample over K = 500 clients (about 200 tweets each, the density of the
  paper's 25 % subsample over 1948 clients), m = 10, the paper's hyper-parameters and attacker set.
* **Attacks.** Black-box (data poisoning) and PGD without model replacement. PGD's radius is what
  the attacker can know: each attacked round it trains one honest update itself on its clean
  examples and projects onto factor × that norm (`honest_norm_factor`): 1.0 (an update the size of
  an honest one) against FedAvg, norm clipping, weak DP and RFA, and 0.2 against Krum and Multi-Krum,
  which keep the updates closest to the others, and so the small ones.
* **Control.** Every attack run is paired with a control: the same run (seed, start, aggregator,
  data, attack case) without the attacker. Raw backdoor accuracy drifts on its own; only the lift
  over the control is the attack's effect.
* **Seeds** 1 and 2 for the attack phase (the starts use seed 0).

Pre-registered criteria, fixed in this docstring and the README before any run of the preset and
never tuned to pass (a claim that fails under them is reported as FAIL with its numbers):

* The **lift** of an attack run is the mean over rounds 1..R of its backdoor accuracy minus its
  control's, in points. Every figure is the mean over seeds, printed with its range over seeds.
* Claim 1, per task: lift(edge) > lift(almost_edge) > lift(normal).
* Claim 2, per task: (a) PGD gets through every defense: its lift is at least 10 points under each of
  the six aggregators; (b) black-box is weak against Krum and Multi-Krum: its lift under each is at
  most half its lift under FedAvg, which must itself be at least 10 points.
* Claim 3 (emnist): the lift falls strictly as attacks get rarer (every 1, 2, 3 rounds: 3, 2, 1 attacks).
* Claim 4, per task: the smallest model's lift is below the largest's, and so is its main-task
  accuracy (the control's at round R).

A claim passes when its test passes on every task it is checked on. Results go to `<out_dir>/claims.md`
with one figure per claim and task (backdoor and main accuracy against rounds, one colour per
setting, its control dashed, black-box marked o and PGD ^, attacked rounds shaded) in
`<out_dir>/figures/`; a second start reuses every finished run.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from fl_lightning.config import check_int, raise_problems
from fl_lightning.experiments.report import Line, attacked_rounds, mean_by_round, plot_curves, read_metrics
from fl_lightning.experiments.sweep import PlannedRun, check_runs, execute_all, format_args, parse_overrides

CASES = {"edge": "100 %", "almost_edge": "50 %", "normal": "10 %"}
DEFENSES: dict[str, list[str]] = {
    "FedAvg": ["aggregator=FedAvg"],
    "NormClipping": ["aggregator={class_path: NormClipping, init_args: {norm_bound: 1.5}}"],
    "WeakDP": ["aggregator={class_path: WeakDP, init_args: {norm_bound: 1.5, stddev: 0.025}}"],
    "Krum": ["aggregator=Krum"],
    "MultiKrum": ["aggregator=MultiKrum"],
    "GeometricMedian": ["aggregator=GeometricMedian"],
}
# PGD's radius as a multiple of the honest update's norm the attacker computes: small against the rules
# that keep the updates nearest the others (Krum's pick is one of the smallest honest updates).
PGD_FACTOR = {"Krum": 0.2, "MultiKrum": 0.2}
PGD_FACTOR_DEFAULT = 1.0
MIN_LIFT = 10.0     # points: a lift below this is no backdoor getting through
WEAK_FRACTION = 0.5  # black-box is "weak" under a defense that leaves it at most half its undefended lift
MARKERS = {"blackbox": "o", "pgd": "^"}  # the figures' marks of the attacks (controls are dashed, unmarked)
COMMON = ["log.logger=csv", "log.progress_bar=false", "fl.checkpoint_every=0"]


@dataclass(frozen=True)
class TaskSetting:
    """One task's part of a preset.

    Attributes:
        task: The task name.
        start: `fit` overrides of the clean starts (the model and attack case are added).
        start_threshold: Main-task accuracy every clean start must reach.
        phase: `fit` overrides of every attack and control run.
        models: Claim 4's models, smallest first; the last is the model of every other claim.
        pgd: Extra PGD overrides of this task.
        claims: The claims checked on this task.
    """

    task: str
    start: tuple[str, ...]
    start_threshold: float
    phase: tuple[str, ...]
    models: tuple[str, ...]
    pgd: tuple[str, ...] = ()
    claims: frozenset[int] = frozenset({1, 2, 4})

    @property
    def model(self) -> str:
        return self.models[-1]


@dataclass(frozen=True)
class Preset:
    """Rounds, schedule, seeds and task settings of one claims preset."""

    description: str
    rounds: int
    attack_every: int
    frequencies: tuple[int, ...]  # claim 3, most frequent first
    seeds: tuple[int, ...]
    tasks: tuple[TaskSetting, ...]


EMNIST_START = ("task=emnist", "data.source=mnist", "data.partition=iid", "data.edge_count=20", "data.clean_count=30",
                "fl.num_clients=1", "fl.clients_per_round=1", "fl.rounds=1", "fl.eval_every=0", "client.lr=0.01",
                "client.local_epochs=1", "client.batch_size=32", "seed=0")
EMNIST_PHASE = ("task=emnist", "data.source=mnist", "data.tile=4", "data.edge_count=20", "data.clean_count=30",
                "fl.num_clients=3383", "fl.clients_per_round=10", "fl.eval_every=1", "fl.eval_subset=2000")
S140_START = ("task=sentiment140", "fl.num_clients=1", "fl.clients_per_round=1", "fl.rounds=1", "fl.eval_every=0",
              "client.local_epochs=1", "seed=0")
S140_PHASE = ("task=sentiment140", "fl.num_clients=500", "fl.clients_per_round=10", "fl.eval_every=1")

PRESETS: dict[str, Preset] = {
    "small": Preset(
        "emnist on MNIST at the paper's density with m = 10 and the attacker's set scaled to keep its round share; "
        "sentiment140 on its 100k sample; 3-round attacks (rounds 1 and 3) from clean starts; seeds 1 and 2",
        rounds=3, attack_every=2, frequencies=(1, 2, 3), seeds=(1, 2),
        tasks=(TaskSetting("emnist", EMNIST_START, 0.97, EMNIST_PHASE, ("lenet_w0.25", "lenet"),
                           claims=frozenset({1, 2, 3, 4})),
               TaskSetting("sentiment140", S140_START, 0.68, S140_PHASE, ("lstm_h50", "lstm_h200"),
                           pgd=("callbacks.project_every=1",)))),
    "quick": Preset(
        "emnist only (the small preset's setting), 2-round attacks (round 1), one seed: a smoke test, not evidence",
        rounds=2, attack_every=2, frequencies=(1, 2), seeds=(1,),
        tasks=(TaskSetting("emnist", EMNIST_START, 0.97, EMNIST_PHASE, ("lenet_w0.25", "lenet"),
                           claims=frozenset({1, 2, 3, 4})),)),
    # The paper's own protocol, for GPUs: EMNIST (not MNIST) over K = 3383 with m = 30 and the paper's
    # attacker set (66 ARDIS sevens + 100 clean images); the full Sentiment140 over K = 1948; 500 rounds with
    # an attacker every 10th round (claim 3: every 1, 10, 50 rounds); three seeds.
    "paper": Preset(
        "the paper's protocol: EMNIST over K = 3383 (m = 30), Sentiment140 over K = 1948 (m = 10), 500 rounds, "
        "an attacker every 10th round; seeds 1, 2 and 3 (hours on a GPU)",
        rounds=500, attack_every=10, frequencies=(1, 10, 50), seeds=(1, 2, 3),
        tasks=(TaskSetting("emnist", ("task=emnist", "data.source=emnist", "data.partition=iid", "fl.num_clients=1",
                                      "fl.clients_per_round=1", "fl.rounds=1", "fl.eval_every=0", "client.lr=0.01",
                                      "client.local_epochs=1", "client.batch_size=32", "seed=0"),
                           0.97, ("task=emnist", "data.source=emnist", "fl.eval_every=1"),
                           ("lenet_w0.25", "lenet"), claims=frozenset({1, 2, 3, 4})),
               TaskSetting("sentiment140", ("task=sentiment140", "data.source=auto", "fl.num_clients=1",
                                            "fl.clients_per_round=1", "fl.rounds=1", "fl.eval_every=0",
                                            "client.local_epochs=1", "seed=0"),
                           0.68, ("task=sentiment140", "data.source=auto", "fl.eval_every=1"),
                           ("lstm_h50", "lstm_h200"), pgd=("callbacks.project_every=1",)))),
}


@dataclass(frozen=True, order=True)
class Condition:
    """One attack or control run of the check, before seeds are told apart by `seed`."""

    task: str
    model: str
    case: str = "edge"
    defense: str = "FedAvg"
    attack: Literal["none", "blackbox", "pgd"] = "none"
    every: int = 0  # attack every this many rounds (0 for a control)
    seed: int = 0

    @property
    def control(self) -> Condition:
        """The same run without the attacker."""
        return replace(self, attack="none", every=0)

    @property
    def name(self) -> str:
        attack = "control" if self.attack == "none" else f"{self.attack}_every{self.every}"
        return f"{self.model}_{self.case}_{self.defense}_{attack}_s{self.seed}".lower()


# ----- the plan -----

def attack_conditions(preset: Preset) -> dict[int, list[Condition]]:
    """The attack runs each claim compares (all seeds); their controls follow from `Condition.control`."""
    by_claim: dict[int, list[Condition]] = {1: [], 2: [], 3: [], 4: []}
    every = preset.attack_every
    for setting in preset.tasks:
        for seed in preset.seeds:
            base = Condition(setting.task, setting.model, attack="blackbox", every=every, seed=seed)
            if 1 in setting.claims:
                by_claim[1] += [replace(base, case=case) for case in CASES]
            if 2 in setting.claims:
                by_claim[2] += [replace(base, defense=d, attack=a) for d in DEFENSES for a in ("blackbox", "pgd")]
            if 3 in setting.claims:
                by_claim[3] += [replace(base, every=k) for k in preset.frequencies]
            if 4 in setting.claims:
                by_claim[4] += [replace(base, model=model) for model in setting.models]
    return by_claim


def all_runs(preset: Preset) -> list[Condition]:
    """Every attack run and control, each once, in a stable order."""
    attacks = [c for conditions in attack_conditions(preset).values() for c in conditions]
    return sorted(set(attacks) | {c.control for c in attacks})


@dataclass
class Plan:
    """Where every clean start and run of a preset goes, and its `fit` command."""

    preset: Preset
    root: Path
    settings: dict[str, TaskSetting] = field(init=False)

    def __post_init__(self) -> None:
        self.settings = {s.task: s for s in self.preset.tasks}

    def start_dir(self, task: str, model: str, case: str) -> Path:
        return self.root / "starts" / f"{task}_{model}_{case}".lower()

    def start(self, task: str, model: str, case: str) -> PlannedRun:
        """The clean start of a (task, model, case)."""
        return planned(self.start_dir(task, model, case),
                       [*COMMON, *self.settings[task].start, f"model={model}", f"data.attack_case={case}"])

    def starts(self) -> list[PlannedRun]:
        """The clean start of every (task, model, case) that an attack or control starts from."""
        return [self.start(*key) for key in dict.fromkeys((c.task, c.model, c.case) for c in all_runs(self.preset))]

    def run_dir(self, condition: Condition) -> Path:
        return self.root / "runs" / condition.task / condition.name

    def phase(self, task: str, model: str, case: str, seed: int, rounds: int | None = None) -> list[str]:
        """The `fit` overrides of an attack phase (or its control) from its clean start, without defense or attack
        (`rounds`: the phase's length; None: the preset's)."""
        return [*COMMON, *self.settings[task].phase, f"model={model}", f"data.attack_case={case}", f"seed={seed}",
                f"fl.rounds={rounds or self.preset.rounds}", f"init_from={self.start_dir(task, model, case)}"]

    def run(self, condition: Condition) -> PlannedRun:
        setting = self.settings[condition.task]
        overrides = [*self.phase(condition.task, condition.model, condition.case, condition.seed),
                     *DEFENSES[condition.defense]]
        if condition.attack != "none":
            overrides += ["callbacks+=EdgeCaseAttack", f"callbacks.mode={condition.attack}",
                          f"callbacks.attack_every={condition.every}", "callbacks.measure_attacker=false"]
            if condition.attack == "pgd":
                factor = PGD_FACTOR.get(condition.defense, PGD_FACTOR_DEFAULT)
                overrides += [f"callbacks.honest_norm_factor={factor}", *setting.pgd]
        return planned(self.run_dir(condition), overrides)

    def runs(self) -> list[PlannedRun]:
        return [self.run(condition) for condition in all_runs(self.preset)]


def planned(run_dir: Path, overrides: list[str]) -> PlannedRun:
    """A `fit` run of these overrides writing into `run_dir`."""
    params = parse_overrides(overrides)
    argv = [sys.executable, "-m", "fl_lightning", "fit", *format_args(params), f"--out_dir={run_dir.parent}",
            f"--name={run_dir.name}"]
    return PlannedRun(name=run_dir.name, params=params, argv=argv, run_dir=run_dir)


def execute(runs: list[PlannedRun], jobs: int, index: Path) -> None:
    """Runs what is unfinished, `jobs` at a time, keeping `index` (one JSON line per run) up to date."""
    rows: list[dict[str, Any]] = [{"name": r.name, "status": "planned", "params": r.params, "run_dir": str(r.run_dir)}
                                  for r in runs]

    def write_index() -> None:
        index.parent.mkdir(parents=True, exist_ok=True)
        index.write_text("".join(json.dumps(row, default=str) + "\n" for row in rows))

    write_index()
    execute_all(runs, rows, jobs, write_index, lambda text: print(text, file=sys.stderr, flush=True),
                reuse_processes=True)
    failed = [row["name"] for row in rows if row.get("status") == "failed"]
    if failed:
        raise SystemExit(f"error: {len(failed)} run(s) failed ({', '.join(failed)}); see their run.log")


def check_starts(plan: Plan, starts: list[PlannedRun]) -> None:
    """Stops the check when a clean start missed its main-accuracy threshold."""
    for run in starts:
        setting = plan.settings[run.params["task"]]
        reached = float(read_metrics(run.run_dir)["main_acc"].iloc[-1])
        if reached < setting.start_threshold:
            raise SystemExit(f"error: the clean start {run.run_dir} reached main accuracy {reached:.4f}, below the "
                             f"preset's threshold {setting.start_threshold}; no attack ran on it")


# ----- the checks -----

@dataclass(frozen=True)
class Estimate:
    """A number measured once per seed: the verdicts use the mean, the printout shows the range too."""

    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values) if self.values else float("nan")

    def __str__(self) -> str:
        if len(self.values) < 2:
            return f"{self.mean:5.1f}"
        return f"{self.mean:5.1f} ({min(self.values):.1f}..{max(self.values):.1f})"


class Results:
    """The per-round metrics of every run of a plan, and the numbers the claims compare.

    Args:
        curves: Each run's metrics (`round`, `main_acc`, `backdoor_acc`), by condition.
        seeds: The seeds to average over.
    """

    def __init__(self, curves: dict[Condition, pd.DataFrame], seeds: tuple[int, ...]) -> None:
        self.curves, self.seeds = curves, seeds

    def lift(self, condition: Condition) -> Estimate:
        """Backdoor accuracy over the control, mean over rounds 1..R, in points, per seed."""
        return Estimate(tuple(lift(self.curves[replace(condition, seed=seed)],
                                   self.curves[replace(condition.control, seed=seed)]) for seed in self.seeds))

    def main(self, condition: Condition) -> Estimate:
        """Main-task accuracy at the last round, in %, per seed."""
        return Estimate(tuple(100 * float(self.curves[replace(condition, seed=s)]["main_acc"].iloc[-1])
                              for s in self.seeds))


def lift(attack: pd.DataFrame, control: pd.DataFrame) -> float:
    """An attack run's backdoor accuracy over its control's, mean over rounds 1..R, in points."""
    both = attack.merge(control, on="round", suffixes=("", "_control"))
    after = both[both["round"] > 0]
    return 100 * float((after["backdoor_acc"] - after["backdoor_acc_control"]).mean())


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def tasks_of(conditions: list[Condition]) -> list[str]:
    return list(dict.fromkeys(c.task for c in conditions))


def one_per_seed(conditions: list[Condition], task: str) -> list[Condition]:
    """The conditions of `task`, one per setting (the seed is averaged by `Results`)."""
    return list(dict.fromkeys(replace(c, seed=0) for c in conditions if c.task == task))


def check_edge_cases(results: Results, conditions: list[Condition]) -> tuple[bool, list[str]]:
    ok, lines = True, []
    for task in tasks_of(conditions):
        lifts = {c.case: results.lift(c) for c in one_per_seed(conditions, task)}
        ordered = lifts["edge"].mean > lifts["almost_edge"].mean > lifts["normal"].mean
        ok &= ordered
        lines.append(f"  {task}: " + "   ".join(f"{case} ({CASES[case]}) {lifts[case]}" for case in CASES)
                     + f"   -> {verdict(ordered)}")
    lines.append("  (lift in points: backdoor accuracy over the no-attack control, mean over rounds 1..R; "
                 "needs edge > almost_edge > normal)")
    return ok, lines


def check_defenses(results: Results, conditions: list[Condition]) -> tuple[bool, list[str]]:
    ok, lines = True, []
    for task in tasks_of(conditions):
        lift = {(c.attack, c.defense): results.lift(c) for c in one_per_seed(conditions, task)}
        lines += [f"  {task}:", "    defense           black-box            PGD"]
        lines += [f"    {d:16s}  {lift['blackbox', d]!s:19s}  {lift['pgd', d]}" for d in DEFENSES]
        through = {d: lift["pgd", d].mean >= MIN_LIFT for d in DEFENSES}
        open_lift = lift["blackbox", "FedAvg"].mean
        weak = {d: open_lift >= MIN_LIFT and lift["blackbox", d].mean <= WEAK_FRACTION * open_lift
                for d in ("Krum", "MultiKrum")}
        task_ok = all(through.values()) and all(weak.values())
        ok &= task_ok
        lines.append(f"    PGD lifts >= {MIN_LIFT:g} points under: "
                     + ", ".join(f"{d} {'yes' if v else 'NO'}" for d, v in through.items()))
        lines.append(f"    black-box keeps <= {WEAK_FRACTION:.0%} of its undefended {open_lift:.1f} points under: "
                     + ", ".join(f"{d} {'yes' if v else 'NO'}" for d, v in weak.items()) + f"   -> {verdict(task_ok)}")
    lines.append("  (lift in points over the no-attack control with the same aggregator, mean over rounds 1..R)")
    return ok, lines


def check_frequency(results: Results, conditions: list[Condition]) -> tuple[bool, list[str]]:
    ok, lines = True, []
    for task in tasks_of(conditions):
        rows = sorted(one_per_seed(conditions, task), key=lambda c: c.every)
        lifts = [results.lift(c) for c in rows]
        task_ok = len(lifts) > 1 and all(a.mean > b.mean for a, b in zip(lifts, lifts[1:]))
        ok &= task_ok
        lines.append(f"  {task}: " + "   ".join(f"every {c.every}: {lift}" for c, lift in zip(rows, lifts))
                     + f"   -> {verdict(task_ok)}")
    lines.append("  (lift in points, mean over rounds 1..R; needs it to fall as attacks get rarer)")
    return ok, lines


def check_capacity(results: Results, conditions: list[Condition]) -> tuple[bool, list[str]]:
    ok, lines = True, []
    for task in tasks_of(conditions):
        by_model = {c.model: c for c in one_per_seed(conditions, task)}  # smallest first, as the preset lists them
        lift = {m: results.lift(c) for m, c in by_model.items()}
        main = {m: results.main(c.control) for m, c in by_model.items()}
        small, large = list(by_model)[0], list(by_model)[-1]
        task_ok = lift[small].mean < lift[large].mean and main[small].mean < main[large].mean
        ok &= task_ok
        lines.append(f"  {task}: " + "   ".join(f"{m} lift {lift[m]} main {main[m]}" for m in by_model)
                     + f"   -> {verdict(task_ok)}")
    lines.append("  (lift in points, mean over rounds 1..R; main: the control's main-task accuracy at round R, %; "
                 "needs the smallest model below the largest in both)")
    return ok, lines


CLAIMS: dict[int, tuple[str, Callable[[Results, list[Condition]], tuple[bool, list[str]]]]] = {
    1: ("Pure edge-case attacks are stronger than not-so-edge ones (100 % > 50 % > 10 %)", check_edge_cases),
    2: ("PGD gets through every defense; black-box data poisoning is weak against Krum and Multi-Krum",
        check_defenses),
    3: ("A lower attack frequency injects the backdoor more slowly", check_frequency),
    4: ("Lower-capacity models resist the backdoor better but lose main-task accuracy", check_capacity),
}


def check(preset: Preset, results: Results) -> tuple[dict[int, bool], list[str]]:
    """Every claim's verdict and its printed lines."""
    verdicts, lines = {}, []
    for claim, conditions in attack_conditions(preset).items():
        title, test = CLAIMS[claim]
        ok, details = test(results, conditions)
        verdicts[claim] = ok
        lines += [f"{claim}. {title} ({', '.join(tasks_of(conditions))}): {verdict(ok)}", *details, ""]
    return verdicts, lines


def load_results(plan: Plan) -> Results:
    return Results({c: read_metrics(plan.run_dir(c)) for c in all_runs(plan.preset)}, plan.preset.seeds)


def mean_curve(results: Results, condition: Condition) -> pd.DataFrame:
    """A setting's metrics averaged over seeds, by round."""
    return mean_by_round([results.curves[replace(condition, seed=s)][["round", "main_acc", "backdoor_acc"]]
                          for s in results.seeds])


def write_figures(preset: Preset, results: Results, out: Path) -> list[Path]:
    """One figure per claim and task: each setting's curves (mean over seeds), its control dashed in its colour."""
    figures = []
    for claim, conditions in attack_conditions(preset).items():
        for task in tasks_of(conditions):
            settings = one_per_seed(conditions, task)
            varying = [k for k in ("case", "defense", "attack", "every", "model")
                       if len({getattr(c, k) for c in settings}) > 1]
            lines, controls = [], {}
            for condition in settings:
                color = controls.setdefault(condition.control, len(controls))
                name = ", ".join(str(getattr(condition, k)) for k in varying)
                lines.append(Line(name, mean_curve(results, condition), color, marker=MARKERS[condition.attack]))
            for control, color in controls.items():
                name = ", ".join(str(getattr(control, k)) for k in varying if k not in ("attack", "every"))
                lines.append(Line(f"{name or 'no'} control".strip(", "), mean_curve(results, control), color,
                                  dashed=True))
            shade = set.intersection(*(attacked_rounds(results.curves[replace(c, seed=s)])
                                       for c in settings for s in results.seeds))
            path = out / f"claim{claim}_{task}.png"
            figures.append(plot_curves(lines, path, f"Claim {claim}, {task}: {CLAIMS[claim][0]}", window=1,
                                       shade=sorted(shade)))
    return figures


def claims(*, preset: Literal["small", "quick", "paper"] = "small", quick: bool = False, out_dir: str = "runs/claims",
           jobs: int = 2) -> None:
    """Runs a claims preset (clean starts, then every attack with its control) and checks the paper's four claims.

    Args:
        preset: `small` (the default: both tasks, two seeds, sized for a 2-core machine), `quick` (emnist, one
            seed: a smoke test) or `paper` (the paper's protocol, for GPUs).
        quick: Shorthand for `--preset quick`.
        out_dir: Where the clean starts, the runs, the figures and claims.md go; finished runs are reused.
        jobs: Runs at a time (each with cores / jobs threads).
    """
    raise_problems([check_int("--jobs", jobs, minimum=1)])
    started = time.perf_counter()
    name = "quick" if quick else preset
    plan = Plan(PRESETS[name], Path(out_dir))
    starts, runs = plan.starts(), plan.runs()
    # Every run is parsed and built before anything starts; the attack runs' settings are checked once
    # their start models exist.
    check_runs(starts)
    check_runs(runs, settings=False)
    execute(starts, jobs, plan.root / "starts" / "index.jsonl")
    check_starts(plan, starts)
    check_runs(runs)
    execute(runs, jobs, plan.root / "runs" / "index.jsonl")
    results = load_results(plan)
    verdicts, lines = check(plan.preset, results)
    figures = write_figures(plan.preset, results, plan.root / "figures")
    minutes = (time.perf_counter() - started) / 60
    header = [f"Claims of Wang et al., \"Attack of the Tails\" (NeurIPS 2020): the {name} preset in {plan.root}",
              f"({plan.preset.description}; this invocation took {minutes:.1f} min)", ""]
    summary = ["Summary: " + ", ".join(f"claim {c} {verdict(ok)}" for c, ok in verdicts.items())]
    text = "\n".join(header + lines + summary)
    print(text)
    (plan.root / "claims.md").write_text("```\n" + text + "\n```\n\n"
                                         + "\n".join(f"![{p.stem}](figures/{p.name})" for p in figures) + "\n")
