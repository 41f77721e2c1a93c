"""`--client.batching vmap`: the batched trainer does the sequential path's math, attacks included."""

from __future__ import annotations

import pytest
import torch
import yaml
from cli_helpers import final_model, read_metrics, run_cli, run_main
from torch import nn

from fl_lightning.batched import batch_schedule, check_vmap_support, clip_grad_norms_, sgd_step_
from fl_lightning.config import ConfigError
from fl_lightning.task import iterate_batches
from fl_lightning.tasks import Toy
from fl_lightning.types import LocalTraining

CPU = ["--log.logger", "csv", "--log.progress_bar", "false", "--accelerator", "cpu", "--num_threads", "1"]
TOY = ["fit", "--task", "toy", *CPU, "--fl.rounds", "3", "--fl.clients_per_round", "7"]
NO_DROPOUT = "--callbacks+=fl_test_callbacks.NoDropout"


def fit_both(capsys, tmp_path, monkeypatch, *argv: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The final global models of the same run, sequential and vmap."""
    monkeypatch.chdir(tmp_path)
    for mode in ("sequential", "vmap"):
        code, _, err = run_main(capsys, *argv, "--client.batching", mode, "--name", mode)
        assert code == 0, err
    return final_model(tmp_path / "runs" / "sequential"), final_model(tmp_path / "runs" / "vmap")


@pytest.mark.parametrize("extra", [
    [],                                                           # preset: momentum 0.9, weight decay 1e-4
    ["--client.grad_clip_norm", "0.3"],                           # clipping on every client
    ["--callbacks+=fl_test_callbacks.VaryClients", "--callbacks.own_optimizer_slot", "2"],  # per-client settings
], ids=["preset", "clip", "per-client"])
def test_toy_vmap_equals_sequential(capsys, tmp_path, monkeypatch, extra):
    sequential, vmap = fit_both(capsys, tmp_path, monkeypatch, *TOY, NO_DROPOUT, *extra)
    torch.testing.assert_close(vmap, sequential, rtol=1e-5, atol=1e-6)
    seq_rows, vmap_rows = read_metrics(tmp_path / "runs" / "sequential"), read_metrics(tmp_path / "runs" / "vmap")
    for seq_row, vmap_row in zip(seq_rows[1:], vmap_rows[1:]):
        assert float(vmap_row["train_loss"]) == pytest.approx(float(seq_row["train_loss"]), rel=1e-5)


def test_emnist_vmap_equals_sequential(capsys, tmp_path, monkeypatch, shared_data):
    # ~60 images per client, batch 32: partial last batches and different step counts per client.
    sequential, vmap = fit_both(capsys, tmp_path, monkeypatch, "fit", "--task", "emnist", "--data.source", "mnist",
                                *CPU, "--fl.num_clients", "1000", "--fl.clients_per_round", "4", "--fl.rounds", "2",
                                "--fl.eval_every", "0", "--client.local_epochs", "2", "--client.batch_size", "32",
                                "--client.lr", "0.05", "--client.momentum", "0.9", "--client.weight_decay", "1e-4",
                                NO_DROPOUT)
    torch.testing.assert_close(vmap, sequential, rtol=1e-4, atol=1e-5)


def test_pgd_attacker_under_vmap_stays_in_its_ball_and_equals_sequential(capsys, tmp_path, monkeypatch):
    eps = 0.3
    attack = ["--callbacks+=EdgeCaseAttack", "--callbacks.mode", "pgd", "--callbacks.eps", str(eps),
              "--callbacks.attack_every", "1", "--callbacks.adv_lr", "0.5", "--callbacks.project_every", "3",
              "--callbacks.measure_attacker", "false"]
    sequential, vmap = fit_both(capsys, tmp_path, monkeypatch, *TOY, NO_DROPOUT, *attack)
    torch.testing.assert_close(vmap, sequential, rtol=1e-5, atol=1e-6)
    rows = read_metrics(tmp_path / "runs" / "vmap")[1:]
    assert all(float(r["num_adversaries"]) == 1 for r in rows)
    assert all(float(r["adv_norm_after_scaling"]) <= eps * (1 + 1e-5) for r in rows)
    assert max(float(r["update_norm_benign"]) for r in rows) > eps  # honest clients were not projected


def test_vmap_on_two_processes_equals_sequential_on_one(tmp_path):
    # Without dropout the grouping of clients on processes does not matter (7 slots: 4 + 3).
    common = [*TOY, "--callbacks+=fl_test_callbacks.NoDropout"]
    run_cli(*common, "--name", "one", cwd=tmp_path)
    run_cli(*common, "--devices", "2", "--client.batching", "vmap", "--name", "two", cwd=tmp_path)
    torch.testing.assert_close(final_model(tmp_path / "runs" / "two"), final_model(tmp_path / "runs" / "one"),
                               rtol=1e-5, atol=1e-6)


def test_vmap_is_saved_reproducible_and_resumable(capsys, tmp_path, monkeypatch):
    # With dropout on, vmap draws differ from sequential ones, but a vmap run repeats itself, also across a resume.
    monkeypatch.chdir(tmp_path)
    vmap = [*TOY, "--client.batching", "vmap"]
    assert run_main(capsys, *vmap, "--name", "straight")[0] == 0
    assert run_main(capsys, *vmap, "--fl.rounds", "2", "--fl.checkpoint_every", "1", "--name", "stopped")[0] == 0
    stopped = tmp_path / "runs" / "stopped"
    assert yaml.safe_load((stopped / "config.yaml").read_text())["client"]["batching"] == "vmap"
    assert run_main(capsys, "fit", "--resume", str(stopped), "--fl.rounds", "3")[0] == 0
    assert yaml.safe_load((stopped / "config.yaml").read_text())["client"]["batching"] == "vmap"
    assert torch.equal(final_model(stopped), final_model(tmp_path / "runs" / "straight"))
    code, out, _ = run_main(capsys, "fit", "--task", "toy", "--print_config")
    assert code == 0 and yaml.safe_load(out)["client"]["batching"] == "sequential"  # never from a preset


@pytest.mark.parametrize("task", ["sentiment140", "reddit"])
def test_unsupported_task_is_refused_through_the_cli(capsys, task):
    code, _, err = run_main(capsys, "fit", "--task", task, "--client.batching", "vmap")
    assert code == 2
    assert f"task {task!r} does not support --client.batching vmap" in err and "sequential" in err, err


def test_batchnorm_is_refused():
    task = Toy(Toy.make_settings(".", num_clients=4))
    check_vmap_support(task)
    task.model.append(nn.BatchNorm1d(4))
    with pytest.raises(ConfigError, match="BatchNorm layer 'model.4'.*--client.batching sequential"):
        check_vmap_support(task)


@pytest.mark.parametrize("drop_last", [False, True])
def test_schedule_draws_the_batches_of_iterate_batches(drop_last):
    data = torch.arange(100.0)
    sizes, batch_sizes, epochs = [23, 5, 40], [8, 16, 10], [2, 3, 1]
    contexts = [LocalTraining(round_idx=1, slot=i, client_id=i, is_adversary=False, model=None, global_params=None,
                              inputs=data[:n], targets=data[:n], lr=0.1, lr_scale=1.0, epochs=e, batch_size=b,
                              momentum=0.0, weight_decay=0.0, grad_clip_norm=0.0, seed=i,
                              generator=torch.Generator().manual_seed(i))
                for i, (n, b, e) in enumerate(zip(sizes, batch_sizes, epochs))]
    schedule = batch_schedule(contexts, drop_last)
    offsets = [0, 23, 28]
    for i, (n, b, e) in enumerate(zip(sizes, batch_sizes, epochs)):
        generator = torch.Generator().manual_seed(i)
        expected = [x for _ in range(e) for x, _ in iterate_batches(data[:n], data[:n], b, generator, drop_last)]
        assert schedule.steps[i] == len(expected)
        for step, batch in enumerate(expected):
            real = schedule.mask[step, i].bool()
            assert torch.equal(schedule.rows[step, i][real] - offsets[i], batch.long())
            assert schedule.counts[step, i] == batch.numel()
        assert not schedule.mask[len(expected):, i].any()
    assert schedule.active == [sum(s > t for s in schedule.steps) for t in range(max(schedule.steps))]


def test_sgd_and_clipping_match_torch_per_client():
    generator = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (4,)]
    lr, momentum, weight_decay, clip = [0.1, 0.5, 0.02], [0.9, 0.0, 0.5], [1e-2, 0.0, 1e-3], [0.3, 0.0, 5.0]
    params = [torch.randn(3, *s, generator=generator) for s in shapes]
    buffers = [torch.zeros_like(p) for p in params]
    references = [[p[i].clone().requires_grad_() for p in params] for i in range(3)]
    optimizers = [torch.optim.SGD(references[i], lr=lr[i], momentum=momentum[i], weight_decay=weight_decay[i])
                  for i in range(3)]
    for step in range(3):
        active = 3 - step  # clients drop out from the end, as in the batched trainer
        grads = [torch.randn(active, *s, generator=generator) for s in shapes]
        for i in range(active):
            for ref, g in zip(references[i], grads):
                ref.grad = g[i].clone()
            if clip[i] > 0:
                torch.nn.utils.clip_grad_norm_(references[i], clip[i])
            optimizers[i].step()
        clip_grad_norms_(grads, torch.tensor(clip[:active]))
        sgd_step_(params, grads, buffers, torch.tensor(lr[:active]), torch.tensor(momentum[:active]),
                  torch.tensor(weight_decay[:active]), first=step == 0)
    for i in range(3):
        for p, ref in zip(params, references[i]):
            torch.testing.assert_close(p[i], ref.detach(), rtol=1e-6, atol=1e-7)
