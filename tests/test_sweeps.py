"""Sweep files and the local sweep runner: every file parses against `fit`, expansion, naming, resume-skip."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import run_main

import fl_lightning.experiments.report as report_module
import fl_lightning.experiments.sweep as sweep_module
from fl_lightning import orchestrator
from fl_lightning.config import ConfigError
from fl_lightning.experiments.sweep import (
    PlannedRun,
    build_argv,
    expand,
    format_args,
    load_sweep,
    plan_runs,
    random_configs,
    read_index,
    resume_argv,
    run_name,
    run_sweep,
)

REPO = Path(__file__).resolve().parent.parent
SWEEP_FILES = sorted((REPO / "sweeps").glob("*.yaml"))
FLOAT_LIKE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def write_sweep(path: Path, parameters: dict, method: str = "grid", **extra) -> Path:
    path.write_text(yaml.safe_dump({"program": "fl_lightning/__main__.py", "method": method, "parameters": parameters,
                                    "command": ["${env}", "${interpreter}", "-m", "fl_lightning", "fit", "${args}"],
                                    **extra}, sort_keys=False))
    return path


def all_values(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from all_values(item)
    elif isinstance(value, list):
        for item in value:
            yield from all_values(item)
    else:
        yield value


# ----- the sweep files -----

def test_there_is_a_file_per_experiment():
    names = {path.stem for path in SWEEP_FILES}
    for task in ("emnist", "cifar10", "sentiment140"):
        assert {f"{task}_defenses", f"{task}_edge_case"} <= names
    assert {"emnist_attack_frequency", "emnist_attacker_pool", "cifar10_capacity", "sentiment140_capacity"} <= names
    readme = (REPO / "sweeps" / "README.md").read_text()
    assert all(path.name in readme for path in SWEEP_FILES), "sweeps/README.md must list every file"


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_sweep_file_is_well_formed(path):
    raw = yaml.safe_load(path.read_text())
    sweep_file = load_sweep(path)  # required keys, method, parameter shapes
    assert raw["name"] == path.stem and raw.get("description") and raw.get("metric", {}).get("name")
    assert sweep_file.command[-1] == "${args}" and sweep_file.command[:5] == [
        "${env}", "${interpreter}", "-m", "fl_lightning", "fit"]
    assert path.read_text().startswith("#"), "a header comment says the question, run count and commands"
    # PyYAML reads 1e-5 as a string: every exponent float must be written 1.0e-5.
    strings = [v for v in all_values(raw["parameters"]) if isinstance(v, str)]
    assert not [s for s in strings if FLOAT_LIKE.match(s)]
    assert expand(sweep_file), "a grid with at least one run"


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_every_parameter_value_parses_against_fit(capsys, path):
    """argv from the first value of every parameter, then each other value in turn, through `fit --print_config`."""
    sweep_file = load_sweep(path)
    first = {key: expand_one(spec)[0] for key, spec in sweep_file.parameters.items()}
    variants = [first] + [{**first, key: value} for key, spec in sweep_file.parameters.items()
                          for value in expand_one(spec)[1:]]
    for params in variants:
        argv = build_argv(sweep_file.command, sweep_file.program, params)
        cli_args = argv[argv.index("fl_lightning") + 1:]
        code, out, err = run_main(capsys, *cli_args, "--print_config")
        assert code == 0, f"{path.name}: {' '.join(cli_args)}\n{err}"
        config = yaml.safe_load(out)
        for key, value in params.items():
            assert lands(config, key, value), f"{path.name}: {key}={value!r} is not in the printed config"


def expand_one(spec: dict) -> list:
    return spec["values"] if "values" in spec else [spec["value"]]


def lands(config: dict, key: str, value) -> bool:
    """Whether a sweep key's value is where the printed config says; `callbacks.X` is the attack's init arg X."""
    if key == "aggregator":  # a class name or {class_path, init_args}
        spec = value if isinstance(value, dict) else {"class_path": value}
        got = config["aggregator"]
        return got["class_path"].endswith(spec["class_path"]) and all(
            got["init_args"][k] == v for k, v in spec.get("init_args", {}).items())
    if key.startswith("callbacks."):
        attack, name = config["callbacks"][-1]["init_args"], key.split(".", 1)[1]
        return all(attack[k] == v for k, v in value.items()) if name == "init_args" else attack[name] == value
    node = config
    for part in key.split("."):
        node = node[part]
    return node == value


def test_printed_config_has_the_swept_attack_and_defense(capsys):
    sweep_file = load_sweep(REPO / "sweeps" / "emnist_defenses.yaml")
    params = {key: expand_one(spec)[-1] for key, spec in sweep_file.parameters.items()}  # PGD + replacement, RFA
    argv = build_argv(sweep_file.command, sweep_file.program, params)
    code, out, _ = run_main(capsys, *argv[argv.index("fl_lightning") + 1:], "--print_config")
    config = yaml.safe_load(out)
    attack = config["callbacks"][0]["init_args"]
    assert code == 0 and len(config["callbacks"]) == 1
    assert (attack["mode"], attack["model_replacement"], attack["eps"]) == ("pgd", True, 0.1)
    assert attack["attack_every"] == 10
    assert config["aggregator"]["class_path"].endswith("GeometricMedian")


# ----- ${args} and the command -----

def test_args_are_formatted_as_wandb_agent_does():
    params = {"fl.rounds": 3, "aggregator": {"class_path": "Krum"}, "flag": True, "lr": 0.5}
    # wandb/sdk/launch/sweeps/utils.py, create_sweep_command_args: f"--{param}={value}" (importing it takes 10 s)
    assert format_args(params) == ["--fl.rounds=3", "--aggregator={'class_path': 'Krum'}", "--flag=True", "--lr=0.5"]


def test_command_macros(monkeypatch):
    monkeypatch.setenv("FL_TEST_ROOT", "/data")
    command = ["${env}", "${interpreter}", "${program}", "--data_dir=${envvar:FL_TEST_ROOT}", "${args}",
               "${args_no_hyphens}", "${args_json}"]
    argv = build_argv(command, "train.py", {"a": 1, "b": "x"})
    tail = argv[argv.index(sys.executable):]
    assert tail == [sys.executable, "train.py", "--data_dir=/data", "--a=1", "--b=x", "a=1", "b=x",
                    json.dumps({"a": 1, "b": "x"})]


# ----- expansion -----

def test_grid_count_order_and_cap(tmp_path):
    path = write_sweep(tmp_path / "g.yaml", {"a": {"values": [1, 2, 3]}, "b": {"values": ["x", "y"]}, "c": {"value": 0},
                                             "d": {"distribution": "int_uniform", "min": 1, "max": 2}})
    configs = expand(load_sweep(path))
    assert len(configs) == 12 and configs[0] == {"a": 1, "b": "x", "c": 0, "d": 1}
    assert [c["a"] for c in configs[:4]] == [1, 1, 1, 1]  # the first parameter varies slowest
    assert len(expand(load_sweep(path), max_runs=5)) == 5
    assert load_sweep(path).swept_keys == ["a", "b", "d"]
    assert len(expand(load_sweep(REPO / "sweeps" / "emnist_defenses.yaml"))) == 18


def test_random_is_seeded_and_respects_distributions(tmp_path):
    params = {"lr": {"distribution": "log_uniform_values", "min": 1.0e-4, "max": 1.0e-1},
              "width": {"distribution": "int_uniform", "min": 1, "max": 8},
              "alpha": {"min": 0.1, "max": 1.0},
              "q": {"distribution": "q_uniform", "min": 0, "max": 10, "q": 2},
              "agg": {"values": ["FedAvg", "Krum"]}, "task": {"value": "toy"}}
    path = write_sweep(tmp_path / "r.yaml", params, method="random")
    first, again = expand(load_sweep(path), max_runs=20, sample_seed=3), expand(load_sweep(path), 20, 3)
    assert first == again and len(first) == 20
    assert expand(load_sweep(path), 20, 4) != first
    for config in first:
        assert 1.0e-4 <= config["lr"] <= 1.0e-1 and isinstance(config["width"], int) and 1 <= config["width"] <= 8
        assert 0.1 <= config["alpha"] <= 1.0 and config["q"] % 2 == 0 and config["task"] == "toy"
    assert {c["agg"] for c in first} == {"FedAvg", "Krum"}
    # few distinct values: duplicates are dropped, so at most 2 runs
    assert len(random_configs({"a": {"values": [1, 2]}}, 10, 0)) == 2


def test_unrunnable_sweeps_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="max_runs"):
        expand(load_sweep(write_sweep(tmp_path / "a.yaml", {"a": {"min": 0.0, "max": 1.0}}, method="random")))
    with pytest.raises(ConfigError, match="W&B server"):
        expand(load_sweep(write_sweep(tmp_path / "b.yaml", {"a": {"values": [1]}}, method="bayes")))
    with pytest.raises(ConfigError, match="grid needs"):
        load_sweep(write_sweep(tmp_path / "c.yaml", {"a": {"min": 0.0, "max": 1.0}}))
    with pytest.raises(ConfigError, match="lacks"):
        (tmp_path / "d.yaml").write_text("method: grid\nparameters: {}\n")
        load_sweep(tmp_path / "d.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_sweep(REPO / "sweeps" / "toy_smoke.yaml", ["fl.rounds"])


def test_set_fixes_or_adds_parameters():
    sweep_file = load_sweep(REPO / "sweeps" / "toy_smoke.yaml", ["aggregator=Krum", "fl.rounds=1", "client.lr=0.05"])
    configs = expand(sweep_file)
    assert len(configs) == 2 and {c["aggregator"] for c in configs} == {"Krum"}
    assert configs[0]["fl.rounds"] == 1 and configs[0]["client.lr"] == 0.05
    assert sweep_file.swept_keys == ["callbacks.init_args"]


def test_run_names_are_deterministic_and_follow_the_command(tmp_path):
    params = {"aggregator": "Krum", "callbacks.init_args": {"mode": "pgd", "eps": 1.0}, "task": "toy"}
    command = ["${interpreter}", "-m", "fl_lightning", "fit", "${args}"]
    name = run_name(params, ["callbacks.init_args", "aggregator"], command, "p.py")
    assert name == run_name(dict(params), ["callbacks.init_args", "aggregator"], command, "p.py")
    assert name.startswith("pgd-1.0_Krum-") and re.fullmatch(r"[A-Za-z0-9._=+-]+", name)
    assert name != run_name({**params, "task": "emnist"}, ["callbacks.init_args", "aggregator"], command, "p.py")
    assert name != run_name(params, ["callbacks.init_args", "aggregator"], [*command, "--seed=1"], "p.py")


def test_resume_argv_reloads_the_saved_config(tmp_path):
    run = PlannedRun("r", {}, ["/usr/bin/env", "python", "-m", "fl_lightning", "fit", "--callbacks+=EdgeCaseAttack",
                               "--name=r"], tmp_path / "r")
    assert resume_argv(run) == ["/usr/bin/env", "python", "-m", "fl_lightning", "fit", f"--resume={tmp_path / 'r'}"]
    (tmp_path / "r").mkdir()
    assert run.status() == "new"
    (tmp_path / "r" / "checkpoint.safetensors").write_bytes(b"")
    assert run.status() == "partial"
    (tmp_path / "r" / "model.safetensors").write_bytes(b"")
    assert run.status() == "done"


# ----- the CLI and a real (toy) sweep -----

def test_cli_forms_reach_the_commands(capsys, monkeypatch, tmp_path):
    """What the user types is what jsonargparse parses: positionals, repeated `--set`, bare and valued flags."""
    calls = []
    monkeypatch.setattr(sweep_module, "run_sweep", lambda *args: calls.append(args) or (tmp_path, []))
    assert run_main(capsys, "sweep", "a.yaml", "--set", "x=1", "--set=y=2", "--max_runs", "3", "--dry_run")[0] == 0
    assert run_main(capsys, "sweep", "--max_runs=3", "a.yaml", "--dry_run", "false")[0] == 0
    assert calls == [("a.yaml", 3, ["x=1", "y=2"], "runs", 0, 1, True), ("a.yaml", 3, None, "runs", 0, 1, False)]
    reports = []
    monkeypatch.setattr(report_module, "write_report", lambda *args: reports.append(args) or ("", []))
    assert run_main(capsys, "report", "d1", "d2", "--out", "o", "--group_by", "a", "--group_by", "b")[0] == 0
    assert reports == [(["d1", "d2"], "o", ["a", "b"], None, 10)]


def test_sweep_cli_dry_run(capsys, tmp_path):
    code, _, err = run_main(capsys, "sweep", str(REPO / "sweeps" / "toy_smoke.yaml"), "--dry_run",
                            "--set", "fl.rounds=1", "--set", "aggregator=Krum", "--out_dir", str(tmp_path))
    assert code == 0 and "2 run(s)" in err and err.count("--fl.rounds=1") == 2 and "--aggregator=Krum" in err
    assert not (tmp_path / "toy_smoke").exists()


def test_a_bad_run_stops_the_sweep_before_anything_starts(capsys, tmp_path):
    """Every run is parsed as `fit` parses it first: one line naming the run and option, exit 2, nothing written."""
    code, _, err = run_main(capsys, "sweep", str(REPO / "sweeps" / "toy_smoke.yaml"), "--set", "fl.rounds=abc",
                            "--out_dir", str(tmp_path))
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: run blackbox_FedAvg-") and ": --fl.rounds=abc: expected int" in err
    assert not list(tmp_path.iterdir())


def test_sweep_check_runs_fits_own_checks(capsys, tmp_path, monkeypatch):
    """Settings that only `fit`'s checks refuse (`orchestrator.check_fit`, stood in for here) stop it the same way."""
    def check_fit(*, fl, **kwargs):
        if fl.rounds == 0:
            raise ConfigError("--fl.rounds=0: must be > 0")

    monkeypatch.setattr(orchestrator, "check_fit", check_fit, raising=False)
    args = ["sweep", str(REPO / "sweeps" / "toy_smoke.yaml"), "--out_dir", str(tmp_path), "--set"]
    code, _, err = run_main(capsys, *args, "fl.rounds=0", "--dry_run")
    assert code == 2 and err.count("\n") == 1 and err.endswith(": --fl.rounds=0: must be > 0\n"), err
    assert run_main(capsys, *args, "fl.rounds=1", "--dry_run")[0] == 0
    assert not list(tmp_path.iterdir())


def test_interrupted_sweep_skips_finished_runs(tmp_path, monkeypatch):
    """Two real 1-round toy runs; started again, the sweep runs nothing and keeps its index."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    overrides = ["fl.rounds=1", "log.logger=csv", "log.progress_bar=false", "num_threads=1"]
    sweep_dir, rows = run_sweep(REPO / "sweeps" / "toy_smoke.yaml", max_runs=2, overrides=overrides,
                                out_dir=tmp_path, jobs=2, quiet=True)
    assert [row["status"] for row in rows] == ["done", "done"], (sweep_dir / rows[0]["name"] / "run.log").read_text()
    index = read_index(sweep_dir)
    assert [row["name"] for row in index] == [row["name"] for row in rows]
    assert index[0]["params"]["fl.rounds"] == 1 and index[0]["swept_keys"] == ["callbacks.init_args", "aggregator"]
    assert (sweep_dir / "index.csv").read_text().splitlines()[0].startswith("name,status,returncode,seconds,")
    config = yaml.safe_load((sweep_dir / rows[1]["name"] / "config.yaml").read_text())
    assert config["aggregator"]["class_path"].endswith("Krum") and config["log"]["group"] == "toy_smoke"

    def no_subprocess(*args, **kwargs):
        raise AssertionError("a finished run was started again")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    _, again = run_sweep(REPO / "sweeps" / "toy_smoke.yaml", max_runs=2, overrides=overrides, out_dir=tmp_path,
                         quiet=True)
    assert [row["status"] for row in again] == ["done", "done"]
    # The planned names match the directories that were written.
    sweep_file = load_sweep(REPO / "sweeps" / "toy_smoke.yaml", overrides)
    planned = plan_runs(sweep_file, expand(sweep_file, 2), sweep_dir)
    assert all(run.status() == "done" for run in planned)


def test_a_run_in_a_reused_worker_equals_one_in_a_fresh_process(tmp_path):
    """A worker that already ran something else gives the bitwise-same model; a bad run does not stop it."""
    import torch
    from cli_helpers import final_model, run_cli

    from fl_lightning.experiments.sweep import Worker

    common = ["fit", "--task", "toy", "--fl.rounds", "2", "--log.logger", "csv", "--log.progress_bar", "false",
              "--num_threads", "1", "--callbacks+=EdgeCaseAttack", "--callbacks.attack_every", "1",
              "--callbacks.mode", "pgd", "--callbacks.honest_norm_factor", "0.5", "--out_dir", str(tmp_path / "runs")]
    worker, log = Worker(), tmp_path / "worker.log"
    try:
        assert worker.run([*common, "--seed", "3", "--aggregator", "Krum", "--name", "before"], log) == 0
        assert worker.run(["fit", "--task", "nope"], log) == 2
        assert worker.run([*common, "--name", "reused"], log) == 0
    finally:
        worker.close()
    run_cli(*common, "--name", "fresh", cwd=tmp_path)
    assert torch.equal(final_model(tmp_path / "runs" / "reused"), final_model(tmp_path / "runs" / "fresh"))
    assert "error: unknown task 'nope'" in log.read_text() and "final model" in log.read_text()
    assert not Worker.takes(["--devices=2"]) and Worker.takes(["--devices", "1"]) and Worker.takes([])


def test_an_attack_scheduled_after_the_last_round_is_the_control(capsys, tmp_path, monkeypatch):
    """The modern-defenses sweeps' control: bitwise the run without the attacker."""
    from cli_helpers import final_model

    monkeypatch.chdir(tmp_path)
    common = ("fit", "--task", "toy", "--fl.rounds", "2", "--log.logger", "csv", "--log.progress_bar", "false",
              "--aggregator", "FLTrust")
    assert run_main(capsys, *common, "--name", "plain")[0] == 0
    assert run_main(capsys, *common, "--callbacks+=EdgeCaseAttack", "--callbacks.start_round", "1000000",
                    "--name", "scheduled_late")[0] == 0
    assert torch.equal(final_model(tmp_path / "runs" / "plain"), final_model(tmp_path / "runs" / "scheduled_late"))
