"""The command line: help, print_config for every task, config round trips, and every bad input's error."""

from __future__ import annotations

import pytest
import yaml
from cli_helpers import run_main

from fl_lightning.tasks import TASKS


def test_help_lists_the_commands(capsys):
    code, out, _ = run_main(capsys, "--help")
    assert code == 0 and "fit" in out and "validate" in out


@pytest.mark.parametrize("task", sorted(TASKS))
def test_print_config_for_every_task(capsys, task):
    code, out, _ = run_main(capsys, "fit", "--task", task, "--print_config")
    assert code == 0
    config = yaml.safe_load(out)
    assert config["task"] == task and "rounds" in config["fl"] and "lr" in config["client"]


def test_dotted_overrides_and_config_file(capsys, tmp_path):
    code, out, _ = run_main(capsys, "fit", "--task", "toy", "--fl.rounds=7", "--client.lr", "0.5", "--print_config")
    assert code == 0
    path = tmp_path / "run.yaml"
    path.write_text(out)
    code, out, _ = run_main(capsys, "fit", "--config", str(path), "--seed", "3", "--print_config")
    config = yaml.safe_load(out)
    assert (config["fl"]["rounds"], config["client"]["lr"], config["seed"]) == (7, 0.5, 3)


def test_saved_config_reproduces_the_run(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, _ = run_main(capsys, "fit", "--task", "toy", "--fl.rounds", "1", "--log.logger", "csv",
                          "--log.progress_bar", "false", "--name", "first", "--client.lr", "0.05")
    assert code == 0
    saved = yaml.safe_load((tmp_path / "runs" / "first" / "config.yaml").read_text())
    assert saved["client"]["lr"] == 0.05 and saved["client"]["local_epochs"] == 2  # presets resolved
    code, _, _ = run_main(capsys, "fit", "--config", str(tmp_path / "runs" / "first" / "config.yaml"),
                          "--name", "second")
    assert code == 0
    first = (tmp_path / "runs" / "first" / "metrics.csv").read_text().splitlines()
    second = (tmp_path / "runs" / "second" / "metrics.csv").read_text().splitlines()
    assert [row.split(",")[:3] for row in first] == [row.split(",")[:3] for row in second]


BAD_INPUTS = [
    (["fit", "--task", "nope"], "unknown task 'nope'", "toy"),
    (["fit", "--task", "toy", "--fl.clients_per_round", "50"], "--fl.clients_per_round=50 is larger than", "1..20"),
    (["fit", "--task", "toy", "--fl.rounds", "0"], "--fl.rounds must be > 0", "0"),
    (["fit", "--task", "toy", "--client.lr", "-0.1"], "--client.lr must be > 0", "-0.1"),
    (["fit", "--task", "toy", "--client.local_epochs", "0"], "--client.local_epochs must be > 0", "0"),
    (["fit", "--task", "toy", "--aggregator", "Nope"], "unknown aggregator 'Nope'", "FedAvg"),
    (["fit", "--task", "toy", "--callbacks+=Nope"], "unknown callback 'Nope'", "valid"),
    (["fit", "--task", "toy", "--aggregator", "no.such.Module"], "aggregator", "no.such.Module"),
    (["fit", "--config", "/nonexistent/run.yaml"], "config", "does not exist"),
    (["fit", "--task", "toy", "--data_dir", "/nonexistent/data"], "/nonexistent/data", "--data_dir"),
    (["fit", "--task", "toy", "--data.edge_count", "5"], "--data.edge_count=5: task 'toy' does not take it", "unset"),
]


@pytest.mark.parametrize(("argv", "message", "detail"), BAD_INPUTS, ids=lambda v: " ".join(v) if isinstance(v, list)
                         else None)
def test_bad_input_gets_a_clear_error(capsys, argv, message, detail):
    code, _, err = run_main(capsys, *argv)
    assert code == 2
    assert message in err and detail in err, err


def test_invalid_config_file(capsys, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("task: [toy\n")
    code, _, err = run_main(capsys, "fit", "--config", str(path))
    assert code == 2 and "config" in err.lower()


def test_unknown_key_in_config_file(capsys, tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("task: toy\nfl:\n  roundz: 3\n")
    code, _, err = run_main(capsys, "fit", "--config", str(path))
    assert code == 2 and "roundz" in err


def test_missing_data_dir_from_environment(capsys, monkeypatch):
    monkeypatch.setenv("FL_LIGHTNING_DATA", "/nonexistent/shared")
    code, _, err = run_main(capsys, "fit", "--task", "toy")
    assert code == 2 and "FL_LIGHTNING_DATA" in err and "/nonexistent/shared" in err


def test_existing_run_is_not_overwritten(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--task", "toy", "--fl.rounds", "1", "--log.logger", "none", "--name", "once"]
    assert run_main(capsys, *args)[0] == 0
    code, _, err = run_main(capsys, *args)
    assert code == 2 and "--resume" in err


def test_resume_without_checkpoint(capsys, tmp_path):
    code, _, err = run_main(capsys, "fit", "--task", "toy", "--resume", str(tmp_path))
    assert code == 2 and "checkpoint" in err
