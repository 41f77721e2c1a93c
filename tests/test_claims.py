"""The claims check: its plan (every attack paired with a control, runs valid `fit` commands) and its verdicts on
synthetic results (a result that should fail does fail)."""

from __future__ import annotations

from dataclasses import replace

import pandas as pd
import pytest
import yaml
from cli_helpers import run_main

from fl_lightning.experiments import claims as claims_module
from fl_lightning.experiments.claims import (
    CASES,
    DEFENSES,
    PRESETS,
    Condition,
    Plan,
    Results,
    all_runs,
    attack_conditions,
    check,
)

SMALL = PRESETS["small"]


def curve(backdoor: list[float], main: float = 0.98) -> pd.DataFrame:
    return pd.DataFrame({"round": range(len(backdoor)), "main_acc": main, "backdoor_acc": backdoor})


def synthetic(lifts: dict[Condition, float], rounds: int = 3, control_level: float = 0.1,
              mains: dict[str, float] | None = None, seed_spread: float = 0.0) -> Results:
    """Results whose controls sit at `control_level` and whose attack runs sit `lifts[c]` points above it.

    Attack conditions missing from `lifts` get 30 points; `seed_spread` shifts seed s by (s - 1.5) * spread points.
    """
    curves = {}
    for condition in all_runs(SMALL):
        main = (mains or {}).get(condition.model, 0.98)
        if condition.attack == "none":
            curves[condition] = curve([control_level] * (rounds + 1), main)
            continue
        key = replace(condition, seed=0)
        lift = lifts.get(key, 30.0) + (condition.seed - 1.5) * seed_spread
        curves[condition] = curve([control_level] + [control_level + lift / 100] * rounds, main)
    return Results(curves, SMALL.seeds)


def passing_lifts() -> dict[Condition, float]:
    """Lifts (points) under which every claim of the small preset holds."""
    lifts = {}
    for conditions in attack_conditions(SMALL).values():
        for c in conditions:
            c = replace(c, seed=0)
            if c.case != "edge":
                lifts[c] = {"almost_edge": 20.0, "normal": 10.0}[c.case]
            elif c.attack == "blackbox" and c.defense in ("Krum", "MultiKrum"):
                lifts[c] = 5.0
            elif c.every != SMALL.attack_every and c.attack == "blackbox" and c.defense == "FedAvg":
                lifts[c] = {1: 50.0, 3: 15.0}[c.every]
            elif c.model in ("lenet_w0.25", "lstm_h50"):
                lifts[c] = 12.0
    return lifts


SMALL_MAINS = {"lenet_w0.25": 0.95, "lenet": 0.98, "lstm_h50": 0.66, "lstm_h200": 0.70}


def test_lift_is_the_mean_over_rounds_of_attack_minus_control():
    edge = Condition("emnist", "lenet", attack="blackbox", every=2)
    curves = {}
    for seed, (attack, control) in {1: ([0.1, 0.5, 0.3, 0.6, 0.2], [0.1, 0.1, 0.2, 0.1, 0.1]),
                                    2: ([0.2, 0.4, 0.4, 0.4, 0.4], [0.2, 0.2, 0.2, 0.2, 0.2])}.items():
        curves[replace(edge, seed=seed)] = curve(attack)
        curves[replace(edge.control, seed=seed)] = curve(control)
    lift = Results(curves, (1, 2)).lift(edge)
    assert lift.values == pytest.approx((100 * (0.4 + 0.1 + 0.5 + 0.1) / 4, 20.0))
    assert lift.mean == pytest.approx((27.5 + 20.0) / 2) and str(lift) == " 23.8 (20.0..27.5)"


def test_every_claim_passes_on_results_that_bear_it_out():
    verdicts, lines = check(SMALL, synthetic(passing_lifts(), mains=SMALL_MAINS))
    assert verdicts == {1: True, 2: True, 3: True, 4: True}, "\n".join(lines)


@pytest.mark.parametrize("breaks, claim", [
    # not-so-edge as strong as edge
    ({Condition("sentiment140", "lstm_h200", "normal", attack="blackbox", every=2): 40.0}, 1),
    # PGD stopped by RFA on one task only
    ({Condition("emnist", "lenet", defense="GeometricMedian", attack="pgd", every=2): 9.9}, 2),
    # black-box not weak against Multi-Krum (more than half of FedAvg's 30)
    ({Condition("sentiment140", "lstm_h200", defense="MultiKrum", attack="blackbox", every=2): 15.1}, 2),
    # rarer attacks as strong as frequent ones
    ({Condition("emnist", "lenet", attack="blackbox", every=3): 30.0}, 3),
    # the small model more backdoored than the large
    ({Condition("emnist", "lenet_w0.25", attack="blackbox", every=2): 31.0}, 4),
])
def test_a_result_that_should_fail_does_fail(breaks, claim):
    lifts = {**passing_lifts(), **breaks}
    verdicts, lines = check(SMALL, synthetic(lifts, mains=SMALL_MAINS))
    assert verdicts == {c: c != claim for c in (1, 2, 3, 4)}, "\n".join(lines)


def test_black_box_needs_an_undefended_effect_to_be_called_weak():
    lifts = {**passing_lifts(), **{Condition("emnist", "lenet", defense=d, attack="blackbox", every=2): 4.0
                                   for d in DEFENSES}}
    verdicts, lines = check(SMALL, synthetic(lifts, mains=SMALL_MAINS))
    assert not verdicts[2] and "undefended 4.0 points" in "\n".join(lines)


def test_claim_4_needs_the_main_task_loss_too():
    verdicts, _ = check(SMALL, synthetic(passing_lifts(), mains={**SMALL_MAINS, "lenet_w0.25": 0.99}))
    assert verdicts == {1: True, 2: True, 3: True, 4: False}


def test_verdicts_use_the_mean_over_seeds():
    # Seed 1 at 30 - 0.5 * 30 = 15 points, seed 2 at 45 under the edge attack: the mean 30 decides.
    verdicts, lines = check(SMALL, synthetic(passing_lifts(), mains=SMALL_MAINS, seed_spread=30.0))
    assert all(verdicts.values()) and "(15.0..45.0)" in "\n".join(lines)


def test_plan_pairs_every_attack_with_a_control(tmp_path):
    plan = Plan(SMALL, tmp_path)
    runs = all_runs(SMALL)
    attacks = [c for c in runs if c.attack != "none"]
    assert {c.control for c in attacks} == {c for c in runs if c.attack == "none"}
    # Per seed: emnist 12 (claim 2) + 2 cases + 2 frequencies + 1 model attacks, 6 + 2 + 1 controls;
    # sentiment140 the same without claim 3.
    assert len(attacks) == 2 * (17 + 15) and len(runs) - len(attacks) == 2 * (9 + 9)
    assert len(plan.starts()) == 4 + 4
    for condition in attacks:
        run, control = plan.run(condition), plan.run(condition.control)
        differ = {k for k in {*run.params, *control.params} if run.params.get(k) != control.params.get(k)}
        assert differ <= {"callbacks+", "callbacks.mode", "callbacks.attack_every", "callbacks.measure_attacker",
                          "callbacks.honest_norm_factor", "callbacks.project_every"}
        assert run.params["init_from"] == str(plan.start_dir(condition.task, condition.model, condition.case))
    assert {c.case for c in attacks} == set(CASES)


@pytest.mark.parametrize("preset", ["small", "paper"])
def test_preset_runs_are_valid_fit_commands(capsys, tmp_path, preset):
    plan = Plan(PRESETS[preset], tmp_path)
    runs = plan.runs()
    # One of every kind: the starts, each defense with PGD, the not-so-edge cases, the small models.
    sample = [*plan.starts(), *(r for r in runs if "pgd" in r.name and "_s1" in r.name),
              *(r for r in runs if ("normal" in r.name or "w0.25" in r.name or "h50" in r.name) and "_s1" in r.name)]
    for run in sample:
        cli_args = run.argv[run.argv.index("fl_lightning") + 1:]
        if "init_from" in run.params:  # the start model does not exist yet: check everything else
            cli_args = [a for a in cli_args if not a.startswith("--init_from")]
        code, out, err = run_main(capsys, *cli_args, "--print_config")
        assert code == 0, f"{' '.join(cli_args)}\n{err}"
        config = yaml.safe_load(out)
        assert config["log"]["logger"] == "csv"
        if config["task"] == "emnist" and preset == "small":
            assert config["data"]["source"] == "mnist" and config["data"]["edge_count"] == 20


def test_a_start_below_its_threshold_stops_the_check(tmp_path):
    plan = Plan(SMALL, tmp_path)
    start = plan.starts()[0]
    start.run_dir.mkdir(parents=True)
    curve([0.0, 0.1], main=0.9).to_csv(start.run_dir / "metrics.csv", index=False)
    with pytest.raises(SystemExit, match="reached main accuracy 0.9000, below the preset's threshold 0.97"):
        claims_module.check_starts(plan, [start])


def test_claims_cli_presets(capsys, monkeypatch, tmp_path):
    chosen = []
    monkeypatch.setattr(claims_module, "Plan", lambda preset, root: chosen.append(preset) or (_ for _ in ()).throw(
        SystemExit(0)))
    for args in (["--quick"], ["--preset", "paper"], []):
        run_main(capsys, "claims", *args, "--out_dir", str(tmp_path))
    assert chosen == [PRESETS["quick"], PRESETS["paper"], PRESETS["small"]]
    code, _, err = run_main(capsys, "claims", "--preset", "huge")
    assert code == 2 and "--preset" in err


def test_figures_one_per_claim_and_task_with_dashed_controls(tmp_path, monkeypatch):
    drawn = []
    real = claims_module.plot_curves
    monkeypatch.setattr(claims_module, "plot_curves", lambda lines, path, *a, **k: drawn.append((path.name, lines))
                        or real(lines, path, *a, **k))
    figures = claims_module.write_figures(SMALL, synthetic(passing_lifts(), mains=SMALL_MAINS), tmp_path)
    assert sorted(p.name for p in figures) == sorted(
        ["claim1_emnist.png", "claim1_sentiment140.png", "claim2_emnist.png", "claim2_sentiment140.png",
         "claim3_emnist.png", "claim4_emnist.png", "claim4_sentiment140.png"])
    assert all(p.stat().st_size > 10_000 for p in figures)
    lines = dict(drawn)["claim2_emnist.png"]
    # 12 attack settings, each with its control dashed in its colour: one control per defense.
    solid, dashed = [ln for ln in lines if not ln.dashed], [ln for ln in lines if ln.dashed]
    assert len(solid) == 12 and len(dashed) == 6 and {ln.color for ln in solid} == {ln.color for ln in dashed}
    assert "GeometricMedian control" in {ln.label for ln in dashed}
