"""The claims check: `python -m fl_lightning claims [--out_dir DIR] [--quick]`.

Runs a preset small enough for a 2-core machine and checks the four claims of Wang et al.,
"Attack of the Tails: Yes, You Really Can Backdoor Federated Learning", NeurIPS 2020
(arXiv:2007.05084), printing each with the measured numbers and PASS or FAIL:

1. pure edge-case attacks are stronger than not-so-edge ones (attacker's share 100 % > 50 % > 10 %);
2. PGD attacks get through all the defenses, while black-box data poisoning is weak against Krum
   and Multi-Krum;
3. lower attack frequency injects the backdoor more slowly;
4. lower-capacity models resist the backdoor better but lose main-task accuracy.

The preset is the sweep files of `sweeps/` with `--set` overrides (nothing here re-implements an
experiment): the `emnist` task on its `mnist` source with the paper's EMNIST hyper-parameters
(K = 3383, m = 30, 5 local epochs, batch 512, lr 0.1), and `sentiment140` on its offline 100k-tweet
sample over K = 500 clients (about 200 tweets each, the density of the paper's 25 % subsample over
1948 clients). As in the paper, attacks start from a model trained without attack (`init_from`); for
these short runs one attacker takes part every 5th round from round 1 (the paper: every 10th over
hundreds of rounds), so that, as in the paper's curves, the backdoor can fade between attacks.
Every model of the capacity runs starts from its own clean model (their parameter counts differ).

The criteria are fixed here, before any run: "backdoor" is the target-task accuracy averaged over
all rounds after the start (the area under the paper's curve: it counts how high the backdoor gets,
how fast and how long it stays); "main" is the main-task accuracy at the end, smoothed by the paper's
10-round rolling mean. PGD "gets through" a defense when it keeps at least half of its undefended
backdoor accuracy; black-box is "weak" against a defense when it keeps at most half of its own.
Results go to `<out_dir>/claims.md`, with a report per claim and task in `<out_dir>/reports/`; a second
start reuses every finished run.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl_lightning.config import check_int, raise_problems
from fl_lightning.experiments.report import RunResult, find_runs, summarize, write_report
from fl_lightning.experiments.sweep import (
    PlannedRun,
    check_runs,
    execute_all,
    expand,
    format_args,
    load_sweep,
    parse_overrides,
    plan_runs,
    write_index,
)

# The checkout's sweep files (an editable install); a plain install has none, so `./sweeps` is the fallback.
SWEEPS = next((p for p in (Path(__file__).resolve().parents[2] / "sweeps", Path("sweeps")) if p.is_dir()),
              Path("sweeps"))
FRACTION = 0.5  # "gets through": keeps at least half; "weak": keeps at most half
EMNIST = ["task=emnist", "data.source=mnist", "log.logger=csv", "log.progress_bar=false", "fl.eval_every=2",
          "fl.checkpoint_every=10"]
SENTIMENT = ["task=sentiment140", "fl.num_clients=500", "log.logger=csv", "log.progress_bar=false",
             "fl.eval_every=1", "fl.checkpoint_every=10"]
# Every attack run: one attacker every 5th round; not measuring the attacker's own accuracy saves a
# second 10,000-image evaluation per attacked round.
ATTACK = ["callbacks.measure_attacker=false", "callbacks.attack_every=5"]
CASES = {"edge": "100 %", "almost_edge": "50 %", "normal": "10 %"}
DEFENSES = ("FedAvg", "NormClipping", "WeakDP", "Krum", "MultiKrum", "GeometricMedian")


@dataclass(frozen=True)
class Preset:
    """Round counts and model variants of one preset."""

    rounds: int                  # attack runs, each from a clean model
    pretrain_rounds: int         # the clean emnist models
    widths: tuple[str, ...]      # emnist models of claim 4, smallest first
    sentiment: bool              # also run sentiment140 (claims 1 and 4)
    s140_pretrain_rounds: int = 30
    s140_rounds: int = 20
    s140_models: tuple[str, ...] = ("lstm_h50", "lstm_h200")


PRESETS = {
    "full": Preset(rounds=20, pretrain_rounds=20, widths=("lenet_w0.125", "lenet_w0.25", "lenet_w0.5", "lenet"),
                   sentiment=True),
    "quick": Preset(rounds=10, pretrain_rounds=10, widths=("lenet_w0.25", "lenet"), sentiment=False),
}


@dataclass
class Invocation:
    """One sweep file run with overrides into its own directory (a sweep directory is one invocation)."""

    claim: int
    file: str
    overrides: list[str]
    subdir: str
    max_runs: int | None = None

    def plan(self, out_dir: Path) -> tuple[Any, Path, list[PlannedRun]]:
        sweep_file = load_sweep(SWEEPS / self.file, self.overrides)
        sweep_dir = out_dir / self.subdir / sweep_file.name
        return sweep_file, sweep_dir, plan_runs(sweep_file, expand(sweep_file, self.max_runs), sweep_dir)


def clean_run(out_dir: Path, name: str, overrides: list[str]) -> PlannedRun:
    """A model trained without attack, the start of the attack runs (the paper's protocol)."""
    params = parse_overrides(overrides)
    argv = [sys.executable, "-m", "fl_lightning", "fit", *format_args(params), f"--out_dir={out_dir / 'clean'}",
            f"--name={name}"]
    return PlannedRun(name=name, params=params, argv=argv, run_dir=out_dir / "clean" / name)


def plan(preset: Preset, out_dir: Path) -> tuple[list[PlannedRun], list[Invocation]]:
    """The clean models (phase 1) and the sweeps that attack them (phase 2).

    Every model variant starts from its own clean model and gets its own invocation (and directory),
    since `--set` fixes one value.
    """
    def pretrain(task: str, base: list[str], model: str, rounds: int) -> PlannedRun:
        return clean_run(out_dir, f"{task}_clean_{model}", [*base, f"model={model}", f"fl.rounds={rounds}",
                                                            "fl.eval_every=0"])

    emnist_clean = {model: pretrain("emnist", EMNIST, model, preset.pretrain_rounds)
                    for model in dict.fromkeys(("lenet", *preset.widths))}
    emnist = [*EMNIST, *ATTACK, f"fl.rounds={preset.rounds}"]
    attack = [*emnist, "model=lenet", f"init_from={emnist_clean['lenet'].run_dir}"]
    invocations = [
        Invocation(1, "emnist_edge_case.yaml", attack, "emnist"),
        # The grid's first 12 runs: black-box and PGD against the six defenses (no model replacement).
        Invocation(2, "emnist_defenses.yaml", attack, "emnist", max_runs=12),
        # The file sweeps callbacks.attack_every, so it keeps its values.
        Invocation(3, "emnist_attack_frequency.yaml", [a for a in attack if "attack_every" not in a], "emnist"),
        *(Invocation(4, "emnist_capacity.yaml", [*emnist, f"model={model}", f"init_from={emnist_clean[model].run_dir}"],
                     f"emnist_{model}") for model in preset.widths),
    ]
    clean = list(emnist_clean.values())
    if preset.sentiment:
        s140 = [*SENTIMENT, *ATTACK, f"fl.rounds={preset.s140_rounds}"]
        for model in preset.s140_models:
            run = pretrain("sentiment140", SENTIMENT, model, preset.s140_pretrain_rounds)
            clean.append(run)
            invocations.append(Invocation(4, "sentiment140_capacity.yaml",
                                          [*s140, f"model={model}", f"init_from={run.run_dir}"],
                                          f"sentiment140_{model}"))
            if model == preset.s140_models[-1]:  # the paper's LSTM (hidden 200) also answers claim 1
                invocations.append(Invocation(1, "sentiment140_edge_case.yaml",
                                              [*s140, f"model={model}", f"init_from={run.run_dir}"], "sentiment140"))
    return clean, invocations


def run_phase(out_dir: Path, clean: list[PlannedRun], invocations: list[Invocation], jobs: int) -> None:
    """Runs the clean models and the planned sweeps of one phase together, `jobs` at a time.

    Every run's `fit` arguments are checked before the phase writes or starts anything.
    """
    planned = [invocation.plan(out_dir) for invocation in invocations]
    runs: list[PlannedRun] = [*clean, *(run for _, _, sweep_runs in planned for run in sweep_runs)]
    check_runs(runs)
    rows: list[dict[str, Any]] = [{"name": r.name, "params": r.params, "run_dir": str(r.run_dir)} for r in clean]
    indexes = []
    for sweep_file, sweep_dir, sweep_runs in planned:
        sweep_rows = [{"name": r.name, "status": "planned", "params": r.params, "argv": r.argv,
                       "run_dir": str(r.run_dir)} for r in sweep_runs]
        write_index(sweep_dir, sweep_file, sweep_rows)
        indexes.append((sweep_dir, sweep_file, sweep_rows))
        rows += sweep_rows

    def write_indexes() -> None:
        for sweep_dir, sweep_file, sweep_rows in indexes:
            write_index(sweep_dir, sweep_file, sweep_rows)

    execute_all(runs, rows, jobs, write_indexes, lambda text: print(text, file=sys.stderr, flush=True))
    failed = [row["name"] for row in rows if row.get("status") == "failed"]
    if failed:
        raise SystemExit(f"error: {len(failed)} run(s) failed ({', '.join(failed)}); see their run.log")


# ----- the checks -----

def results(out_dir: Path, invocation: Invocation) -> list[tuple[RunResult, dict[str, Any]]]:
    """The runs of one invocation with their summary numbers."""
    _, sweep_dir, _ = invocation.plan(out_dir)
    return [(run, summarize(run.metrics)) for run in find_runs(sweep_dir)]


def pct(value: float) -> str:
    return f"{100 * value:5.1f}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def check_edge_cases(found: dict[str, list]) -> tuple[bool, list[str]]:
    lines, ok = [], True
    for task, runs in found.items():
        by_case = {run.params["data.attack_case"]: stats["mean_backdoor"] for run, stats in runs}
        values = [by_case.get(case, float("nan")) for case in CASES]
        ordered = values[0] > values[1] > values[2]
        ok &= ordered
        lines.append(f"  {task}: " + "   ".join(f"{case} ({share}) {pct(v)}" for (case, share), v in
                                                  zip(CASES.items(), values)) + f"   -> {verdict(ordered)}")
    lines.append("  (backdoor accuracy %, mean over rounds 1..R; needs edge > almost_edge > normal)")
    return ok, lines


def defense_name(value: Any) -> str:
    return value["class_path"] if isinstance(value, dict) else str(value)


def check_defenses(runs: list) -> tuple[bool, list[str]]:
    table: dict[tuple[str, str], float] = {}
    for run, stats in runs:
        table[(run.params["callbacks.init_args"]["mode"], defense_name(run.params["aggregator"]))] = \
            stats["mean_backdoor"]
    nan = float("nan")
    lines = ["  defense           black-box    PGD"]
    for defense in DEFENSES:
        lines.append(f"  {defense:16s}  {pct(table.get(('blackbox', defense), nan))}      "
                     f"{pct(table.get(('pgd', defense), nan))}")
    pgd_open, bb_open = table.get(("pgd", "FedAvg"), nan), table.get(("blackbox", "FedAvg"), nan)
    through = {d: table.get(("pgd", d), nan) >= FRACTION * pgd_open for d in DEFENSES}
    weak = {d: table.get(("blackbox", d), nan) <= FRACTION * bb_open for d in ("Krum", "MultiKrum")}
    lines.append(f"  PGD keeps >= {FRACTION:.0%} of its undefended {pct(pgd_open).strip()} % under: "
                 + ", ".join(f"{d} {'yes' if v else 'NO'}" for d, v in through.items()))
    lines.append(f"  black-box keeps <= {FRACTION:.0%} of its undefended {pct(bb_open).strip()} % under: "
                 + ", ".join(f"{d} {'yes' if v else 'NO'}" for d, v in weak.items()))
    lines.append("  (backdoor accuracy %, mean over rounds 1..R)")
    return all(through.values()) and all(weak.values()), lines


def check_frequency(runs: list) -> tuple[bool, list[str]]:
    rows = sorted(((run.params["callbacks.attack_every"], stats) for run, stats in runs), key=lambda r: r[0])
    means = [stats["mean_backdoor"] for _, stats in rows]
    ok = len(means) > 1 and all(a > b for a, b in zip(means, means[1:]))
    lines = ["  attack every   mean backdoor   at round R   rounds to 50 % (smoothed)"]
    for every, stats in rows:
        reached = stats["rounds_to_50"]
        lines.append(f"  {every:>5d} rounds   {pct(stats['mean_backdoor'])}           {pct(stats['final_backdoor'])}"
                     f"        {'never' if reached is None else reached}")
    lines.append("  (backdoor accuracy %, mean over rounds 1..R; needs it to fall as attacks get rarer)")
    return ok, lines


def check_capacity(found: dict[str, list], order: dict[str, tuple[str, ...]]) -> tuple[bool, list[str]]:
    lines, ok = [], True
    for task, runs in found.items():
        by_model = {run.params["model"]: stats for run, stats in runs}
        models = [m for m in order[task] if m in by_model]
        if len(models) < 2:
            ok = False
            lines.append(f"  {task}: fewer than two models finished -> FAIL")
            continue
        small, large = by_model[models[0]], by_model[models[-1]]
        task_ok = small["mean_backdoor"] < large["mean_backdoor"] and small["smoothed_main"] < large["smoothed_main"]
        ok &= task_ok
        lines.append(f"  {task}: " + "   ".join(f"{m} backdoor {pct(by_model[m]['mean_backdoor'])} main "
                                                  f"{pct(by_model[m]['smoothed_main'])}" for m in models)
                     + f"   -> {verdict(task_ok)}")
    lines.append("  (backdoor: mean over rounds 1..R; main: 10-round mean at the end; in %; needs the smallest "
                 "model below the largest in both)")
    return ok, lines


def check(preset: Preset, out_dir: Path, invocations: list[Invocation]) -> list[str]:
    """The four claims with their numbers, as printed lines."""
    by_claim: dict[int, list[Invocation]] = {}
    for invocation in invocations:
        by_claim.setdefault(invocation.claim, []).append(invocation)

    def task_of(invocation: Invocation) -> str:
        return invocation.file.split("_", 1)[0]

    edge = {task_of(i): results(out_dir, i) for i in by_claim[1]}
    capacity: dict[str, list] = {}
    for invocation in by_claim[4]:
        capacity.setdefault(task_of(invocation), []).extend(results(out_dir, invocation))
    checks = [
        ("1. Pure edge-case attacks are stronger than not-so-edge ones (100 % > 50 % > 10 %)",
         check_edge_cases(edge)),
        ("2. PGD gets through every defense; black-box data poisoning is weak against Krum and Multi-Krum (emnist)",
         check_defenses(results(out_dir, by_claim[2][0]))),
        ("3. A lower attack frequency injects the backdoor more slowly (emnist)",
         check_frequency(results(out_dir, by_claim[3][0]))),
        ("4. Lower-capacity models resist the backdoor better but lose main-task accuracy",
         check_capacity(capacity, {"emnist": preset.widths, "sentiment140": preset.s140_models})),
    ]
    lines = []
    for title, (ok, details) in checks:
        lines += [f"{title}: {verdict(ok)}", *details, ""]
    return lines


def write_reports(root: Path, invocations: list[Invocation]) -> None:
    """One report (table and figures) per claim and task, over all its sweep directories."""
    groups: dict[str, list[Path]] = {}
    for invocation in invocations:
        key = f"claim{invocation.claim}_{invocation.file.split('_', 1)[0]}"
        groups.setdefault(key, []).append(invocation.plan(root)[1])
    for key, sweep_dirs in groups.items():
        write_report(sweep_dirs, out=root / "reports" / key)


def claims(*, out_dir: str = "runs/claims", quick: bool = False, jobs: int = 2) -> None:
    """Runs the claims preset (emnist on mnist, sentiment140 on its sample) and checks the paper's four claims.

    Args:
        out_dir: Where the clean models, the sweeps, their reports and claims.md go; finished runs are reused.
        quick: The smaller preset: emnist only, 10 rounds per run, two model widths.
        jobs: Runs at a time (each with cores / jobs threads).
    """
    raise_problems([check_int("--jobs", jobs, minimum=1)])
    started = time.perf_counter()
    name = "quick" if quick else "full"
    preset, root = PRESETS[name], Path(out_dir)
    clean, invocations = plan(preset, root)
    # A bad attack run stops the check before the clean models train: parsed and built now, its
    # settings checked by run_phase once its `init_from` model exists.
    check_runs(clean)
    check_runs([run for invocation in invocations for run in invocation.plan(root)[2]], settings=False)
    run_phase(root, clean, [], jobs)
    run_phase(root, [], invocations, jobs)
    write_reports(root, invocations)
    minutes = (time.perf_counter() - started) / 60
    header = [f"Claims of Wang et al., \"Attack of the Tails\" (NeurIPS 2020), on the {name} preset in {root}",
              f"(emnist on the mnist source{', sentiment140 on its 100k sample' if preset.sentiment else ''}; "
              f"{preset.rounds}-round attacks from a clean model; this invocation took {minutes:.1f} min)", ""]
    lines = header + check(preset, root, invocations)
    text = "\n".join(lines)
    print(text)
    (root / "claims.md").write_text("```\n" + text + "\n```\n")
