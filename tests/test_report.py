"""Reports: the table's numbers on hand-made metrics, grouping over seeds, loose runs, and the PNG figures."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from fl_lightning.__main__ import main
from fl_lightning.experiments.report import (
    find_runs,
    label,
    markdown_table,
    pretty,
    read_metrics,
    rounds_to,
    smooth,
    summarize,
    varying_keys,
    write_report,
)
from fl_lightning.experiments.sweep import load_sweep, write_index

# Rounds 0..11; round 12 was not evaluated (empty accuracies) and must be ignored.
BACKDOOR = [0.0, 0.9, 0.7, 0.3, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.2]
MAIN = [0.1, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.9, 0.9, 0.92, 0.94, 0.95]


def write_run(run_dir: Path, backdoor: list[float], main: list[float], config: dict | None = None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"round": r, "main_acc": m, "backdoor_acc": b, "seconds": 1.0}
            for r, (m, b) in enumerate(zip(main, backdoor))]
    rows.append({"round": len(rows), "main_acc": None, "backdoor_acc": None, "seconds": 1.0})
    pd.DataFrame(rows).to_csv(run_dir / "metrics.csv", index=False)
    if config is not None:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    return run_dir


def test_smoothing_is_a_10_round_rolling_mean_with_min_periods_1():
    smoothed = smooth(pd.Series(BACKDOOR)).tolist()
    assert smoothed[0] == 0.0 and smoothed[1] == pytest.approx(0.45) and smoothed[2] == pytest.approx(1.6 / 3)
    assert smoothed[9] == pytest.approx(sum(BACKDOOR[:10]) / 10)
    assert smoothed[11] == pytest.approx(sum(BACKDOOR[2:12]) / 10)  # the window slides past round 0


def test_summary_numbers_by_hand(tmp_path):
    metrics = read_metrics(write_run(tmp_path / "run", BACKDOOR, MAIN))
    assert metrics["round"].tolist() == list(range(12))  # the unevaluated round is dropped
    stats = summarize(metrics)
    assert stats["rounds"] == 11 and stats["final_main"] == 0.95 and stats["final_backdoor"] == 0.2
    assert stats["best_backdoor"] == 0.9
    assert stats["smoothed_backdoor"] == pytest.approx(0.68)  # (0.7 + 0.3 + 7 * 0.8 + 0.2) / 10
    assert stats["mean_backdoor"] == pytest.approx(7.7 / 11)  # rounds 1..11, not the start model
    # Raw accuracy passes 50 % at round 1, the smoothed curve only at round 2 (0.45, then 0.533).
    assert stats["rounds_to_50"] == 2
    assert rounds_to(metrics, threshold=0.8) is None  # the smoothed curve peaks at 0.75 (round 10)


def make_sweep(tmp_path: Path) -> Path:
    """A sweep directory by hand: attack x defense x 2 seeds; the seed-1 runs are 0.1 lower in backdoor."""
    sweep_yaml = tmp_path / "demo.yaml"
    sweep_yaml.write_text(yaml.safe_dump({
        "name": "demo", "program": "p.py", "method": "grid", "command": ["${args}"],
        "parameters": {"callbacks.init_args": {"values": [{"mode": "blackbox"}, {"mode": "pgd", "eps": 1.0}]},
                       "aggregator": {"values": ["FedAvg", {"class_path": "NormClipping",
                                                            "init_args": {"norm_bound": 1.5}}]},
                       "seed": {"values": [0, 1]}}}, sort_keys=False))
    sweep_file = load_sweep(sweep_yaml)
    sweep_dir, rows = tmp_path / "sweeps" / "demo", []
    for i, (attack, aggregator, seed) in enumerate(
            (a, g, s) for a in sweep_file.parameters["callbacks.init_args"]["values"]
            for g in sweep_file.parameters["aggregator"]["values"] for s in (0, 1)):
        shift = 0.1 * seed + 0.3 * (aggregator != "FedAvg")
        name = f"run{i}"
        write_run(sweep_dir / name, [max(0.0, b - shift) for b in BACKDOOR], MAIN)
        rows.append({"name": name, "status": "done", "run_dir": str(sweep_dir / name),
                     "params": {"callbacks.init_args": attack, "aggregator": aggregator, "seed": seed}})
    write_index(sweep_dir, sweep_file, rows)
    return sweep_dir


def test_sweep_table_groups_seeds(tmp_path):
    sweep_dir = make_sweep(tmp_path)
    runs = find_runs(sweep_dir)
    assert len(runs) == 8 and varying_keys(runs) == ["callbacks.init_args", "aggregator", "seed"]
    text, figures = write_report([sweep_dir])
    table = [line for line in text.splitlines() if line.startswith("| mode=")]
    assert len(table) == 4  # 2 attacks x 2 defenses, seeds averaged
    fedavg = table[0].split(" | ")
    # seeds 0 and 1 average to BACKDOOR - 0.05: final 0.2 - 0.05 = 15 %, best 85 %
    assert fedavg[:3] == ["| mode=blackbox", "FedAvg", "2"] and fedavg[5:6] == ["15.0"] and fedavg[7] == "85.0"
    clipped = table[1].split(" | ")
    assert clipped[1] == "NormClipping(norm_bound=1.5)" and clipped[-1] == "never |"  # 0.35 lower: never 50 %
    # One figure per attack (the first swept key), one line per defense, as the paper draws them.
    assert sorted(p.name for p in figures) == ["accuracy_blackbox.png", "accuracy_pgd-1.0.png"]
    for figure in figures:
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 10_000
    assert (sweep_dir / "report" / "report.md").read_text() == text


def test_loose_runs_are_told_apart_by_their_configs(tmp_path):
    base = {"task": "toy", "seed": 0, "out_dir": "x", "fl": {"rounds": 11}, "log": {"group": "a"},
            "aggregator": {"class_path": "fl_lightning.FedAvg", "init_args": {}}}
    write_run(tmp_path / "runs" / "a", BACKDOOR, MAIN, base)
    write_run(tmp_path / "runs" / "b", [0.0] * 12, MAIN,
              {**base, "out_dir": "y", "log": {"group": "b"},
               "aggregator": {"class_path": "fl_lightning.callbacks.Krum", "init_args": {"num_adversaries": 1}}})
    runs = find_runs(tmp_path / "runs")
    keys = varying_keys(runs)
    assert keys == ["aggregator.class_path", "aggregator.init_args.num_adversaries"]  # not out_dir or log.group
    assert [label(run.params, ["aggregator.class_path"]) for run in runs] == ["FedAvg", "Krum"]
    table = markdown_table([], keys)
    assert table.splitlines()[0].startswith("| aggregator.class_path | aggregator.num_adversaries | runs |")


def test_pretty_labels():
    assert pretty({"class_path": "NormClipping", "init_args": {"norm_bound": 1.5}}) == "NormClipping(norm_bound=1.5)"
    assert pretty({"mode": "pgd", "eps": 0.1, "model_replacement": True}) == "mode=pgd, eps=0.1, model_replacement=True"
    assert pretty("fl_lightning.callbacks.Krum") == "Krum" and pretty("lenet_w0.5") == "lenet_w0.5"
    assert pretty(1e-05) == "1e-05" and pretty(math.nan) == "nan"


def test_report_cli_takes_several_directories(tmp_path, capsys):
    first = write_run(tmp_path / "one", BACKDOOR, MAIN, {"task": "toy", "seed": 0})
    second = write_run(tmp_path / "two", BACKDOOR[::-1], MAIN, {"task": "toy", "seed": 1})
    main(["report", str(first), str(second), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "2 run(s) in 1 group(s)" in out  # only the seed differs: one averaged group
    assert (tmp_path / "out" / "accuracy.png").is_file() and (tmp_path / "out" / "report.md").is_file()


def test_table_shows_detection_rates_when_the_runs_have_them(tmp_path):
    run_dir = write_run(tmp_path / "krum", BACKDOOR[:4], MAIN[:4], config={"aggregator": "Krum"})
    metrics = pd.read_csv(run_dir / "metrics.csv")
    # Round 0 has no update; rounds 2 and 3 had no attacker (no TPR), every round flags one honest update of 10.
    metrics["detection_tpr"] = [None, 1.0, None, 0.0, None]
    metrics["detection_fpr"] = [None, 0.1, 0.1, 0.2, None]
    metrics.to_csv(run_dir / "metrics.csv", index=False)
    text, _ = write_report([run_dir], out=tmp_path / "out")
    header, _, row = text.split("\n\n")[2].splitlines()[:3]
    assert header.endswith("| detection TPR % | detection FPR % |")
    assert row.endswith("| 50.0 | 13.3 |")  # the mean over the rounds that have each
    plain, _ = write_report([write_run(tmp_path / "fedavg", BACKDOOR, MAIN)], out=tmp_path / "out2")
    assert "detection" not in plain
