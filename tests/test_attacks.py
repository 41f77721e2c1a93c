"""The edge-case attack: PGD stays in its ball, model replacement replaces, schedules pick the intended rounds."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from cli_helpers import read_metrics, run_cli
from lightning.fabric import Fabric

from fl_lightning.aggregation import FedAvg
from fl_lightning.callbacks import EdgeCaseAttack
from fl_lightning.callbacks.edge_case import expected_attack_rounds
from fl_lightning.callbacks.pgd import project_l2_ball, replacement_scale, should_project
from fl_lightning.client import train_client
from fl_lightning.config import ClientArgs, ConfigError, FLArgs, resolve_args
from fl_lightning.orchestrator import Run
from fl_lightning.params import flat_params
from fl_lightning.sampling import derive_seed
from fl_lightning.tasks import Toy
from fl_lightning.types import RoundPlan


def make_run(attack: EdgeCaseAttack, seed: int = 0, **client_overrides) -> Run:
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[attack])
    torch.manual_seed(seed)
    fl = resolve_args(Toy.fl_preset, FLArgs())
    client = resolve_args(Toy.client_preset, ClientArgs(**client_overrides))
    task = Toy(Toy.make_settings(".", num_clients=fl.num_clients, seed=seed))
    run = Run(fabric, task, task.build_data(), fl, client, FedAvg(), [attack], seed)
    attack.on_fit_start(task=run.task, data=run.data, fabric=fabric, seed=seed)
    return run


def train_round(run: Run, attack: EdgeCaseAttack, round_idx: int, global_params: torch.Tensor):
    plan = RoundPlan(round_idx, list(range(5)), [False] * 5)
    attack.on_round_start(round_idx=round_idx, plan=plan)
    updates = [train_client(run.fabric, run.task, run.client_context(plan, slot, global_params))
               for slot in range(5)]
    return plan, updates


def test_project_l2_ball_hand_computed():
    center = torch.tensor([1.0, 1.0])
    torch.testing.assert_close(project_l2_ball(torch.tensor([4.0, 5.0]), center, 2.5), torch.tensor([2.5, 3.0]))
    inside = torch.tensor([1.5, 1.0])
    assert project_l2_ball(inside, center, 2.5) is inside


def test_projection_schedule_follows_the_reference():
    assert [b for b in range(23) if should_project(b, 23, 10)] == [0, 10, 20, 22]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("eps", [0.05, 0.3])
def test_pgd_update_stays_inside_the_ball(seed, eps):
    # Random model, data and round from the seed; a large lr pushes the attacker far out.
    attack = EdgeCaseAttack(mode="pgd", eps=eps, project_every=3, attack_every=1, adv_lr=0.5,
                            measure_attacker=False)
    run = make_run(attack, seed=seed)
    initial = flat_params(run.task)
    global_params = initial + 0.1 * torch.randn(initial.numel(), generator=torch.Generator().manual_seed(seed))
    plan, updates = train_round(run, attack, round_idx=1 + seed, global_params=global_params)
    adversarial = [u for u in updates if u.is_adversary]
    assert len(adversarial) == 1
    assert float(adversarial[0].delta.norm()) <= eps * (1 + 1e-5)
    assert adversarial[0].stats["adv_norm_before_scaling"] == pytest.approx(eps, rel=1e-4)  # it pressed the wall
    assert max(float(u.delta.norm()) for u in updates if not u.is_adversary) > eps  # honest ones are not clipped


def honest_norm_on_clean_rows(run: Run, attack: EdgeCaseAttack, plan: RoundPlan, global_params: torch.Tensor) -> float:
    """The norm of an honest update on the attacker's clean rows, trained here with the attacker's eps generator."""
    slot = plan.is_adversary.index(True)
    ctx = run.client_context(plan, slot, global_params)
    is_edge = run.data.extras.get("edge_train_is_edge")  # the toy task marks none: all its rows count
    clean = ~is_edge if is_edge is not None else slice(None)
    honest = replace(ctx, is_adversary=False, inputs=run.data.edge_train_inputs[clean],
                     targets=run.data.edge_train_targets[clean],
                     generator=torch.Generator().manual_seed(derive_seed(0xE95, ctx.seed)))
    return float(train_client(run.fabric, run.task, honest).delta.norm())


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("factor", [0.2, 1.0])
def test_pgd_radius_from_the_honest_norm(seed, factor):
    attack = EdgeCaseAttack(mode="pgd", honest_norm_factor=factor, project_every=1, attack_every=1, adv_lr=0.5,
                            measure_attacker=False)
    run = make_run(attack, seed=seed)
    global_params = flat_params(run.task)
    plan, updates = train_round(run, attack, round_idx=1 + seed, global_params=global_params)
    adversarial = next(u for u in updates if u.is_adversary)
    expected = factor * honest_norm_on_clean_rows(run, attack, plan, global_params)
    assert adversarial.stats["adv_eps"] == pytest.approx(expected, rel=1e-6)
    assert float(adversarial.delta.norm()) <= expected * (1 + 1e-5)
    assert float(adversarial.delta.norm()) == pytest.approx(expected, rel=1e-4)  # a large adv_lr presses the wall
    # Pure in (seed, round): the same round again gives the same radius, another round another one.
    again = EdgeCaseAttack(mode="pgd", honest_norm_factor=factor, project_every=1, attack_every=1, adv_lr=0.5,
                           measure_attacker=False)
    rerun = make_run(again, seed=seed)
    _, same = train_round(rerun, again, round_idx=1 + seed, global_params=global_params)
    _, other = train_round(rerun, again, round_idx=5 + seed, global_params=global_params)
    radius = [next(u for u in ups if u.is_adversary).stats["adv_eps"] for ups in (same, other)]
    assert radius[0] == adversarial.stats["adv_eps"] and radius[1] != radius[0]


def test_honest_norm_factor_needs_pgd():
    attack = EdgeCaseAttack(mode="blackbox", honest_norm_factor=0.5)
    with pytest.raises(ConfigError, match="--callbacks.honest_norm_factor.*mode pgd"):
        attack.check_run(FLArgs(num_clients=20, clients_per_round=5))


def test_model_replacement_with_zero_honest_updates_gives_the_attacker_model():
    attack = EdgeCaseAttack(mode="blackbox", model_replacement=True, attack_every=1, measure_attacker=False)
    run = make_run(attack)
    global_params = flat_params(run.task)
    plan, updates = train_round(run, attack, round_idx=1, global_params=global_params)
    (adversary,) = [u for u in updates if u.is_adversary]
    attacker_model = global_params + adversary.delta / adversary.stats["adv_replacement_scale"]
    deltas = torch.stack([u.delta if u.is_adversary else torch.zeros_like(u.delta) for u in updates])
    weights = torch.tensor([float(u.num_examples) for u in updates])
    new_global = global_params + FedAvg()(deltas, weights, torch.Generator()).update
    torch.testing.assert_close(new_global, attacker_model, rtol=1e-5, atol=1e-6)


def test_replacement_scale_is_shared_by_several_attackers():
    # two attackers of 500 examples among 8 clients of 250: weights 500/3000 each
    scale = replacement_scale(total_examples=2 * 500 + 8 * 250, adversary_examples=2 * 500)
    assert scale == 3.0
    assert 2 * (500 / 3000) * scale == pytest.approx(1.0)  # combined, not k-fold


def test_fixed_frequency_defaults_reproduce_the_reference():
    attack = EdgeCaseAttack()
    assert expected_attack_rounds(attack, 35) == [1, 11, 21, 31]
    windowed = EdgeCaseAttack(attack_every=3, start_round=5, end_round=12)
    assert expected_attack_rounds(windowed, 20) == [5, 8, 11]


def test_fixed_frequency_slots_are_pure_in_seed_and_round():
    attack = EdgeCaseAttack(attack_every=1, num_adversaries=3)
    attack.seed = 7
    slots = attack.adversarial_slots(4, list(range(10)))
    assert len(slots) == 3 and slots == attack.adversarial_slots(4, list(range(10)))
    assert len({tuple(attack.adversarial_slots(r, list(range(10)))) for r in range(1, 30)}) > 5


def test_fixed_pool_members_attack_whenever_sampled():
    attack = EdgeCaseAttack(schedule="fixed_pool", pool_size=6)
    run = make_run(attack, seed=3)
    assert len(attack.pool) == 6 and all(0 <= c < run.data.num_clients for c in attack.pool)
    again = EdgeCaseAttack(schedule="fixed_pool", pool_size=6)
    make_run(again, seed=3)
    assert again.pool == attack.pool
    plan = RoundPlan(1, list(range(20)), [False] * 20)
    attack.on_round_start(round_idx=1, plan=plan)
    assert {c for c, adv in zip(plan.client_ids, plan.is_adversary) if adv} == attack.pool


@pytest.mark.parametrize("kwargs", [{"eps": 0}, {"attack_every": 0}, {"start_round": 5, "end_round": 2},
                                    {"adv_lr": -1.0}])
def test_bad_attack_settings(kwargs):
    with pytest.raises(ConfigError, match="EdgeCaseAttack"):
        EdgeCaseAttack(**kwargs)


def test_blackbox_attack_through_the_cli_plants_the_backdoor(tmp_path):
    run_cli("fit", "--task", "toy", "--fl.rounds", "3", "--log.logger", "csv", "--log.progress_bar", "false",
            "--callbacks+=EdgeCaseAttack", "--callbacks.attack_every", "2", "--callbacks.model_replacement", "true",
            "--name", "attack", "--accelerator", "cpu", cwd=tmp_path)
    rows = read_metrics(tmp_path / "runs" / "attack")
    assert [r["attacked"] for r in rows[1:]] == ["1.0", "0.0", "1.0"]
    assert float(rows[1]["num_adversaries"]) == 1 and float(rows[1]["adv_backdoor_acc"]) > 0.9
    assert float(rows[3]["backdoor_acc"]) > float(rows[2]["backdoor_acc"])
