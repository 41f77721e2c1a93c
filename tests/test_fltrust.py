"""FLTrust (Cao et al., NDSS 2021) and the server's share of the engine: its root set and its own update."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from cli_helpers import read_metrics, run_cli

from fl_lightning.aggregation import RoundContext
from fl_lightning.callbacks import FLTrust
from fl_lightning.callbacks.fltrust import trust_weighted
from fl_lightning.kernels import row_dots
from fl_lightning.server import split_test_rows

ROOT2 = math.sqrt(2.0)


def test_trust_scores_and_rescaling_by_hand():
    deltas = torch.tensor([[1.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    # g_0 = (1, 1): cosines 1/√2, 1/√2, -1/√2 -> TS = (1/√2, 1/√2, 0); |g_0| = √2 rescales g_1 to (√2, 0), g_2 to
    # (0, √2); the step is (TS_1 ḡ_1 + TS_2 ḡ_2) / (TS_1 + TS_2) = (1/√2, 1/√2).
    result = trust_weighted(deltas, torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(result.update, torch.tensor([1 / ROOT2, 1 / ROOT2]))
    torch.testing.assert_close(result.client_weights, torch.tensor([0.5, 0.5, 0.0]))
    assert result.flagged.tolist() == [False, False, True]
    # g_0 = (2, 0): only g_1 is trusted (cos 1), rescaled to norm 2.
    result = trust_weighted(deltas, torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(result.update, torch.tensor([2.0, 0.0]))
    assert result.flagged.tolist() == [False, True, True]


def test_no_trusted_update_means_no_step():
    result = trust_weighted(torch.tensor([[-1.0, 0.0], [0.0, -2.0]]), torch.tensor([1.0, 1.0]))
    assert result.update.tolist() == [0.0, 0.0] and result.flagged.all()


@pytest.mark.parametrize("seed", range(3))
def test_a_boosted_attacker_weighs_no_more_than_the_server_update(seed):
    generator = torch.Generator().manual_seed(seed)
    server = torch.randn(1000, generator=generator)
    honest = server + 0.5 * torch.randn(9, 1000, generator=generator)
    attacker = 100.0 * torch.randn(1, 1000, generator=generator).abs() * server.sign()  # boosted, roughly aligned
    result = trust_weighted(torch.cat([honest, attacker]), server)
    # Every rescaled update has the server's norm, so the step's norm is at most |g_0|.
    assert float(result.update.norm()) <= float(server.norm()) * (1 + 1e-5)
    opposite = trust_weighted(torch.cat([honest, -attacker]), server)  # the far outlier against the server
    assert opposite.flagged.tolist() == [False] * 9 + [True]


def test_row_dots_match_float64_at_millions_of_parameters():
    generator = torch.Generator().manual_seed(0)
    rows, vector = torch.randn(3, 1_500_001, generator=generator), torch.randn(1_500_001, generator=generator)
    exact = rows.double().numpy() @ vector.double().numpy()
    np.testing.assert_allclose(row_dots(rows, vector).numpy(), exact, rtol=1e-9, atol=1e-6)


def test_the_root_set_is_disjoint_from_evaluation_and_leaves_the_eval_subset_as_it_was():
    subset_alone, none = split_test_rows(10_000, 2000, 0)
    evaluated, root = split_test_rows(10_000, 2000, 100)
    assert none is None and torch.equal(evaluated, subset_alone)  # the subset of every earlier run
    assert root.numel() == 100 and not set(root.tolist()) & set(evaluated.tolist())
    everything_but_root, root_again = split_test_rows(10_000, 0, 100)
    assert torch.equal(root_again, root) and everything_but_root.numel() == 9900
    assert not set(root.tolist()) & set(everything_but_root.tolist())
    assert split_test_rows(10_000, 0, 0) == (None, None)
    with pytest.raises(ValueError, match="do not fit"):
        split_test_rows(1000, 950, 100)


def test_fltrust_needs_the_server():
    rule = FLTrust()
    rule.begin_round(RoundContext(1, torch.arange(2), torch.zeros(2)))
    with pytest.raises(ValueError, match="runs inside `fit`"):
        rule.aggregate(torch.ones(2, 2), torch.ones(2), torch.Generator())


def test_the_server_trains_as_a_client_on_its_root_set_which_evaluation_leaves_out():
    from lightning.fabric import Fabric

    from fl_lightning.client import train_client
    from fl_lightning.config import ClientArgs, FLArgs, resolve_args
    from fl_lightning.orchestrator import Run
    from fl_lightning.params import flat_params
    from fl_lightning.tasks import Toy
    from fl_lightning.types import RoundPlan

    torch.manual_seed(0)
    fl, client = resolve_args(Toy.fl_preset, FLArgs()), resolve_args(Toy.client_preset, ClientArgs(lr_decay=0.5))
    task = Toy(Toy.make_settings(".", num_clients=fl.num_clients, seed=0))
    data = task.build_data()
    run = Run(Fabric(accelerator="cpu", devices=1), task, data, fl, client, FLTrust(root_size=40), [], 0)
    num_test = data.test_inputs.shape[0]
    assert run.evaluate.sets["main"][0].shape[0] == num_test - 40
    global_params = flat_params(task)
    server_update = run.server.at_round(3).train(global_params, seed=7)
    # The same training as an honest client of round 3 holding the root rows.
    ctx = run.client_context(RoundPlan(3, [0], [False]), 0, global_params)
    ctx.inputs, ctx.targets = run.server.root_inputs, run.server.root_targets
    ctx.seed, ctx.generator = 7, torch.Generator().manual_seed(7)
    torch.testing.assert_close(server_update, train_client(run.fabric, task, ctx).delta, rtol=0, atol=0)
    assert ctx.lr == pytest.approx(client.lr * 0.25)


def test_fltrust_through_the_cli_trains_on_rows_it_never_evaluates(tmp_path, capsys, monkeypatch):
    import fl_lightning.tasks  # noqa: F401  (registers the tasks, as the CLI does)
    from fl_lightning.evaluation import Evaluator
    from fl_lightning.orchestrator import validate

    common = ("fit", "--task", "toy", "--fl.rounds", "2", "--callbacks+=EdgeCaseAttack", "--callbacks.attack_every",
              "1", "--log.logger", "csv", "--log.progress_bar", "false", "--num_threads", "1")
    run_cli(*common, "--aggregator", "FLTrust", "--aggregator.root_size", "50", "--name", "fltrust", cwd=tmp_path)
    rows = read_metrics(tmp_path / "runs" / "fltrust")
    assert all(row["detection_tpr"] in ("0.0", "1.0") for row in rows[1:])  # one attacker a round: flagged or not
    # validate leaves the root rows out too, and so repeats the run's own last measurement.
    from fl_lightning import orchestrator

    built = []
    monkeypatch.setattr(orchestrator, "Evaluator", lambda *args, **kwargs: built.append(kwargs) or Evaluator(*args,
                                                                                                          **kwargs))
    monkeypatch.chdir(tmp_path)
    assert validate(checkpoint="runs/fltrust")["main_acc"] == float(rows[-1]["main_acc"])
    assert built[0]["server_examples"] == 50
    bad = run_cli(*common, "--aggregator", "FLTrust", "--aggregator.root_size", "0", "--name", "bad", cwd=tmp_path,
                  check=False)
    assert bad.returncode == 2 and "root_size" in bad.stderr and not (tmp_path / "runs" / "bad").exists()
