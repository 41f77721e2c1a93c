"""Every malformed invocation stops before any work: exit status 2, one line `error: ...` naming the option, no
traceback, no run directory, no process launched.

Each case runs the CLI in this process (`fl_lightning.__main__.main`) from an empty working directory; a case that
got past the checks would start training, write `runs/` and fail the "nothing written" check.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from cli_helpers import run_main

TOY = ["fit", "--task", "toy", "--log.logger", "none"]
ATTACK = [*TOY, "--callbacks+=EdgeCaseAttack"]
EMNIST = ["fit", "--task", "emnist", "--data.source", "mnist", "--log.logger", "none"]

FIT_CASES = [
    # task, model, data
    (["fit", "--task", "nope"], "--task"),
    (["fit"], "task"),
    ([*TOY, "--model", "vgg99"], "--model"),
    ([*EMNIST, "--model", "lenet_w0"], "--model"),
    (["fit", "--task", "cifar10", "--model", "vgg99"], "--model"),
    ([*EMNIST[:-2], "--data.source", "kmnist"], "--data.source"),
    ([*TOY, "--data.source", "mnist"], "--data.source"),
    ([*TOY, "--data.alpha", "0"], "--data.alpha"),
    ([*TOY, "--data.alpha", "-1"], "--data.alpha"),
    ([*TOY, "--data.alpha", "nan"], "--data.alpha"),
    ([*TOY, "--data.alpha", "abc"], "--data.alpha"),
    ([*TOY, "--data.partition", "random"], "--data.partition"),
    ([*TOY, "--data.attack_case", "tail"], "--data.attack_case"),
    ([*TOY, "--data.tile", "0"], "--data.tile"),
    ([*TOY, "--data.tile", "1.5"], "--data.tile"),
    (["fit", "--task", "sentiment140", "--data.tile", "2", "--log.logger", "none"], "--data.tile"),
    ([*TOY, "--data.edge_count", "5"], "--data.edge_count"),
    ([*EMNIST, "--data.edge_count", "0"], "--data.edge_count"),
    ([*EMNIST, "--data.edge_count", "100000"], "--data.edge_count"),
    ([*EMNIST, "--data.clean_count", "-1"], "--data.clean_count"),
    ([*TOY, "--data.download", "maybe"], "--data.download"),
    ([*TOY, "--data.nope", "1"], "--data.nope"),
    # fl
    ([*TOY, "--fl.rounds", "0"], "--fl.rounds"),
    ([*TOY, "--fl.rounds", "-3"], "--fl.rounds"),
    ([*TOY, "--fl.rounds", "x"], "--fl.rounds"),
    ([*TOY, "--fl.rounds", "2.5"], "--fl.rounds"),
    ([*TOY, "--fl.num_clients", "0"], "--fl.num_clients"),
    ([*TOY, "--fl.clients_per_round", "0"], "--fl.clients_per_round"),
    ([*TOY, "--fl.clients_per_round", "50"], "--fl.clients_per_round"),
    ([*TOY, "--fl.server_lr", "0"], "--fl.server_lr"),
    ([*TOY, "--fl.server_lr", "inf"], "--fl.server_lr"),
    ([*TOY, "--fl.eval_every", "-1"], "--fl.eval_every"),
    ([*TOY, "--fl.eval_batch_size", "0"], "--fl.eval_batch_size"),
    ([*TOY, "--fl.checkpoint_every", "-2"], "--fl.checkpoint_every"),
    ([*TOY, "--fl.roundz", "3"], "--fl.roundz"),
    # client
    ([*TOY, "--client.lr", "0"], "--client.lr"),
    ([*TOY, "--client.lr", "-0.1"], "--client.lr"),
    ([*TOY, "--client.lr_decay", "0"], "--client.lr_decay"),
    ([*TOY, "--client.lr_decay", "1.5"], "--client.lr_decay"),
    ([*TOY, "--client.momentum", "-0.5"], "--client.momentum"),
    ([*TOY, "--client.weight_decay", "-1"], "--client.weight_decay"),
    ([*TOY, "--client.local_epochs", "0"], "--client.local_epochs"),
    ([*TOY, "--client.batch_size", "0"], "--client.batch_size"),
    ([*TOY, "--client.grad_clip_norm", "-1"], "--client.grad_clip_norm"),
    ([*TOY, "--client.batching", "parallel"], "--client.batching"),
    (["fit", "--task", "sentiment140", "--client.batching", "vmap", "--log.logger", "none"], "--client.batching"),
    # log
    ([*TOY[:-2], "--log.logger", "tensorboard"], "--log.logger"),
    ([*TOY, "--log.progress_bar", "sometimes"], "--log.progress_bar"),
    # process and paths
    ([*TOY, "--accelerator", "quantum"], "--accelerator"),
    ([*TOY, "--accelerator", "gpu"], "--accelerator"),
    ([*TOY, "--devices", "0"], "--devices"),
    ([*TOY, "--devices", "-1"], "--devices"),
    ([*TOY, "--num_nodes", "0"], "--num_nodes"),
    ([*TOY, "--num_threads", "0"], "--num_threads"),
    ([*TOY, "--precision", "16-mixed"], "--precision"),
    ([*TOY, "--seed", "abc"], "--seed"),
    ([*TOY, "--data_dir", "/nonexistent/data"], "--data_dir"),
    ([*TOY, "--init_from", "/nonexistent/run"], "--init_from"),
    (["fit", "--resume", "/nonexistent/run"], "--resume"),
    ([*TOY, "--unknown_option", "1"], "--unknown_option"),
    # aggregators (defenses)
    ([*TOY, "--aggregator", "Nope"], "--aggregator"),
    ([*TOY, "--aggregator", "no.such.Module"], "--aggregator"),
    ([*TOY, "--aggregator", "Krum", "--aggregator.num_adversaries", "-1"], "--aggregator.num_adversaries"),
    ([*TOY, "--aggregator", "Krum", "--aggregator.num_adversaries", "2"], "--aggregator.num_adversaries"),
    ([*TOY, "--aggregator", "MultiKrum", "--aggregator.num_adversaries", "2"], "--aggregator.num_adversaries"),
    ([*TOY, "--aggregator", "MultiKrum", "--aggregator.num_selected", "0"], "--aggregator.num_selected"),
    ([*TOY, "--aggregator", "MultiKrum", "--aggregator.num_selected", "9"], "--aggregator.num_selected"),
    ([*TOY, "--aggregator", "NormClipping", "--aggregator.norm_bound", "0"], "--aggregator.norm_bound"),
    ([*TOY, "--aggregator", "NormClipping", "--aggregator.norm_bound", "-1"], "--aggregator.norm_bound"),
    ([*TOY, "--aggregator", "WeakDP", "--aggregator.stddev", "-0.1"], "--aggregator.stddev"),
    ([*TOY, "--aggregator", "WeakDP", "--aggregator.norm_bound", "0"], "--aggregator.norm_bound"),
    ([*TOY, "--aggregator", "TrimmedMean", "--aggregator.beta", "0.7"], "--aggregator.beta"),
    ([*TOY, "--aggregator", "TrimmedMean", "--aggregator.beta", "-0.1"], "--aggregator.beta"),
    ([*TOY, "--aggregator", "GeometricMedian", "--aggregator.max_iterations", "-1"], "--aggregator.max_iterations"),
    ([*TOY, "--aggregator", "GeometricMedian", "--aggregator.smoothing", "0"], "--aggregator.smoothing"),
    ([*TOY, "--aggregator", "GeometricMedian", "--aggregator.tolerance", "-1"], "--aggregator.tolerance"),
    ([*TOY, "--aggregator", "Krum", "--aggregator.nope", "1"], "--aggregator.nope"),
    ([*TOY, "--aggregator", "NormClipping", "--aggregator.inner", "TrimmedMean", "--aggregator.inner.beta", "0.7"],
     "--aggregator.inner.beta"),
    # callbacks (attacks)
    ([*TOY, "--callbacks+=Nope"], "--callbacks"),
    ([*ATTACK, "--callbacks.eps", "-1"], "--callbacks.eps"),
    ([*ATTACK, "--callbacks.eps", "0"], "--callbacks.eps"),
    ([*ATTACK, "--callbacks.attack_every", "0"], "--callbacks.attack_every"),
    ([*ATTACK, "--callbacks.start_round", "0"], "--callbacks.start_round"),
    ([*ATTACK, "--callbacks.start_round", "5", "--callbacks.end_round", "3"], "--callbacks.end_round"),
    ([*ATTACK, "--callbacks.num_adversaries", "0"], "--callbacks.num_adversaries"),
    ([*ATTACK, "--callbacks.num_adversaries", "6"], "--callbacks.num_adversaries"),
    ([*ATTACK, "--callbacks.schedule", "fixed_pool", "--callbacks.pool_size", "21"], "--callbacks.pool_size"),
    ([*ATTACK, "--callbacks.pool_size", "0"], "--callbacks.pool_size"),
    ([*ATTACK, "--callbacks.project_every", "0"], "--callbacks.project_every"),
    ([*ATTACK, "--callbacks.adv_lr", "-0.1"], "--callbacks.adv_lr"),
    ([*ATTACK, "--callbacks.adv_epochs", "0"], "--callbacks.adv_epochs"),
    ([*ATTACK, "--callbacks.prox_coefficient", "-1"], "--callbacks.prox_coefficient"),
    ([*ATTACK, "--callbacks.mode", "whitebox"], "--callbacks.mode"),
    ([*TOY, "--aggregator", "Bulyan", "--fl.clients_per_round", "6"], "--aggregator.num_adversaries"),
    ([*TOY, "--fl.eval_subset", "-1"], "--fl.eval_subset"),
    ([*ATTACK, "--callbacks.mode", "pgd", "--callbacks.honest_norm_factor", "-1"], "--callbacks.honest_norm_factor"),
    ([*TOY, "--aggregator", "FLAME", "--aggregator.noise_lambda", "-1"], "--aggregator.noise_lambda"),
    ([*TOY, "--aggregator", "FoolsGold", "--aggregator.sketch_size", "1"], "--aggregator.sketch_size"),
    ([*TOY, "--aggregator", "RobustLR", "--aggregator.threshold", "50"], "--aggregator.threshold"),
    ([*TOY, "--callbacks+=LocalDP", "--callbacks.norm_bound", "0"], "--callbacks.norm_bound"),
    ([*ATTACK, "--callbacks.honest_norm_factor", "0.5"], "--callbacks.honest_norm_factor"),
    ([*ATTACK, "--callbacks.mode", "pgd", "--callbacks.honest_norm_factor", "0"], "--callbacks.honest_norm_factor"),
    ([*ATTACK, "--callbacks.schedule", "sometimes"], "--callbacks.schedule"),
    ([*ATTACK, "--callbacks.nope", "1"], "--callbacks.nope"),
    (["fit", "--task", "sentiment140", "--fl.num_clients", "500", "--log.logger", "none", "--callbacks+=EdgeCaseAttack",
      "--callbacks.prox", "true", "--callbacks.eps", "-2"], "--callbacks.eps"),
]

OTHER_CASES = [
    # validate
    (["validate"], "checkpoint"),
    (["validate", "--checkpoint", "/nonexistent/run"], "--checkpoint"),
    (["validate", "--checkpoint", "{empty}"], "--checkpoint"),
    (["validate", "--checkpoint", "{run}", "--devices", "0"], "--devices"),
    (["validate", "--checkpoint", "{run}", "--accelerator", "quantum"], "--accelerator"),
    (["validate", "--checkpoint", "{run}", "--eval_batch_size", "0"], "--eval_batch_size"),
    # sweep, report, claims
    (["sweep", "/nonexistent/sweep.yaml"], "sweep.yaml"),
    (["sweep", "{sweep}", "--set", "fl.rounds=0"], "--fl.rounds"),
    (["sweep", "{sweep}", "--set", "client.lr=-1"], "--client.lr"),
    (["sweep", "{sweep}", "--set", "callbacks.eps=-1"], "eps"),
    (["sweep", "{sweep}", "--max_runs", "0"], "--max_runs"),
    (["sweep", "{sweep}", "--jobs", "0"], "--jobs"),
    (["sweep", "{sweep}", "--set", "novalue"], "--set"),
    (["report", "/nonexistent/runs"], "/nonexistent/runs"),
    (["report", "{empty}"], "{empty}"),
    (["report", "{run}", "--window", "0"], "--window"),
    (["claims", "--jobs", "0"], "--jobs"),
    (["claims", "--preset", "huge"], "--preset"),
    (["nope"], "nope"),
]

CONFIG_CASES = [
    ("task: [toy\n", "config"),
    ("task: toy\nfl:\n  roundz: 3\n", "roundz"),
    ("task: toy\nfl:\n  rounds: 0\n", "--fl.rounds"),
    ("task: toy\naggregator:\n  class_path: TrimmedMean\n  init_args:\n    beta: 0.9\n", "beta"),
    ("task: toy\ncallbacks:\n- class_path: EdgeCaseAttack\n  init_args:\n    eps: -1\n", "eps"),
    ("task: toy\ndata:\n  alpha: 0\n", "--data.alpha"),
]


def assert_clean_refusal(code: int, err: str, option: str, cwd: Path) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert option in lines[0], err
    assert not (cwd / "runs").exists(), "a run directory was written"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    return tmp_path


@pytest.mark.parametrize(("argv", "option"), FIT_CASES, ids=lambda v: " ".join(v[2:]) if isinstance(v, list) else None)
def test_bad_fit_setting_stops_before_launch(capsys, workdir, argv, option):
    code, _, err = run_main(capsys, *argv)
    assert_clean_refusal(code, err, option, workdir)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A real one-round toy run (made once) to validate and report on."""
    root = tmp_path_factory.mktemp("finished")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        from fl_lightning.__main__ import main

        main(["fit", "--task", "toy", "--fl.rounds", "1", "--log.logger", "csv", "--log.progress_bar", "false",
              "--name", "done"])
    finally:
        os.chdir(cwd)
    return root / "runs" / "done"


@pytest.mark.parametrize(("argv", "option"), OTHER_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_command_stops_before_any_work(capsys, workdir, finished_run, argv, option):
    sweep = workdir / "one.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "one", "program": "fl_lightning/__main__.py", "method": "grid",
        "command": ["${env}", "${interpreter}", "-m", "fl_lightning", "fit", "--callbacks+=EdgeCaseAttack", "${args}"],
        "parameters": {"task": {"value": "toy"}, "fl.rounds": {"value": 1}, "log.logger": {"value": "none"},
                       "aggregator": {"values": ["FedAvg", "TrimmedMean"]}}}))
    (workdir / "empty").mkdir()
    fill = {"{run}": str(finished_run), "{empty}": str(workdir / "empty"), "{sweep}": str(sweep)}
    argv = [fill.get(arg, arg) for arg in argv]
    capsys.readouterr()  # the finished run's own output
    code, _, err = run_main(capsys, *argv)
    assert_clean_refusal(code, err, fill.get(option, option), workdir)


@pytest.mark.parametrize(("text", "option"), CONFIG_CASES)
def test_bad_config_file_stops_before_launch(capsys, workdir, text, option):
    path = workdir / "bad.yaml"
    path.write_text(text + "log:\n  logger: none\n" if "log:" not in text else text)
    code, _, err = run_main(capsys, "fit", "--config", str(path))
    assert_clean_refusal(code, err, option, workdir)


def test_the_walk_covers_at_least_80_invocations():
    assert len(FIT_CASES) + len(OTHER_CASES) + len(CONFIG_CASES) >= 80
