"""Neurotoxin (Zhang et al., ICML 2022) as an option of the edge-case attack, and the backdoor lifespan of reports."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from cli_helpers import final_model, read_metrics, run_cli, run_main
from test_attacks import make_run, train_round  # the attack tests' toy run

from fl_lightning.aggregation import Aggregate
from fl_lightning.callbacks import EdgeCaseAttack
from fl_lightning.callbacks.edge_case import top_k_mask
from fl_lightning.config import ConfigError
from fl_lightning.experiments.report import Group, RunResult, lifespan, markdown_table
from fl_lightning.params import flat_params


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is faster, and never waits for busy cores (conftest restores the count)."""
    torch.set_num_threads(1)


def observe_step(attack: EdgeCaseAttack, step: torch.Tensor, round_idx: int = 1, noise: torch.Tensor | None = None):
    attack.on_after_aggregate(aggregate=Aggregate(update=step, client_weights=None, noise=noise), round_idx=round_idx)


# ----- the mask -----

def test_mask_is_the_top_k_of_the_last_global_step_with_ties_to_the_lower_index():
    step = torch.tensor([0.5, -2.0, 1.0, -1.0, 1.0, 0.1])
    # k = 3: |-2| first, then two of the three tied 1s: the lower indices 2 and 3.
    assert top_k_mask(step, 0.5).tolist() == [False, True, True, True, False, False]
    assert top_k_mask(step, 0.1).tolist() == [False, True, False, False, False, False]  # round(0.6) = 1
    assert not top_k_mask(step, 0.05).any()  # round(0.3) = 0 coordinates
    assert top_k_mask(torch.ones(10), 0.3).tolist() == [True] * 3 + [False] * 7  # all tied
    attack = EdgeCaseAttack(neurotoxin_ratio=0.5)
    observe_step(attack, step, round_idx=4)
    assert attack.neurotoxin_mask.tolist() == [False, True, True, True, False, False]
    assert attack.neurotoxin_round == 4
    # With server noise the attacker sees server_lr * update + noise: the difference of the global models.
    attack._server_lr = 2.0
    observe_step(attack, step, noise=torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 5.0]))
    # 2 * step + noise = [1, -4, 2, -2, 2, 5.2]: 5.2, -4, then the first of the tied 2s.
    assert attack.neurotoxin_mask.tolist() == [False, True, True, False, False, True]


def test_no_mask_is_recorded_when_off():
    attack = EdgeCaseAttack()
    observe_step(attack, torch.tensor([1.0, 2.0]))
    assert attack.neurotoxin_mask is None and attack.state_dict() == {}


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan"), "0.1", True])
def test_bad_ratio_is_refused_in_one_line(ratio):
    with pytest.raises(ConfigError, match="EdgeCaseAttack neurotoxin_ratio must be a number in") as error:
        EdgeCaseAttack(neurotoxin_ratio=ratio)
    assert "\n" not in str(error.value)


def test_mask_survives_state_dict_and_load_state_dict():
    attack = EdgeCaseAttack(neurotoxin_ratio=0.3)
    step = torch.randn(37, generator=torch.Generator().manual_seed(0))  # not a multiple of 8 bits
    observe_step(attack, step, round_idx=7)
    state = json.loads(json.dumps(attack.state_dict()))  # as the checkpoint's JSON holds it
    restored = EdgeCaseAttack(neurotoxin_ratio=0.3)
    restored.load_state_dict(state)
    assert torch.equal(restored.neurotoxin_mask, attack.neurotoxin_mask) and restored.neurotoxin_round == 7
    assert int(restored.neurotoxin_mask.sum()) == 11  # round(0.3 * 37)
    restored.load_state_dict({})  # a checkpoint from before any global step
    assert restored.neurotoxin_mask is None


# ----- the attacker's update -----

ATTACKS = {
    "blackbox": {"measure_attacker": True},  # evaluates the attacker's (reset) model too
    "pgd": {"mode": "pgd", "eps": 0.3, "project_every": 2, "adv_lr": 0.5},
    "replacement": {"model_replacement": True},
    "pgd+replacement": {"mode": "pgd", "eps": 0.3, "project_every": 2, "model_replacement": True},
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attacker_update_is_exactly_zero_on_the_masked_coordinates(name):
    attack = EdgeCaseAttack(**{"attack_every": 1, "measure_attacker": False, "neurotoxin_ratio": 0.3, **ATTACKS[name]})
    run = make_run(attack, seed=1, momentum=0.9, weight_decay=1e-3)  # not plain SGD: the reset still holds
    global_params = flat_params(run.task)
    step = torch.randn(global_params.numel(), generator=torch.Generator().manual_seed(3))
    observe_step(attack, step, round_idx=1)
    mask = attack.neurotoxin_mask
    assert int(mask.sum()) == round(0.3 * global_params.numel())
    _, updates = train_round(run, attack, round_idx=2, global_params=global_params)
    (adversary,) = [u for u in updates if u.is_adversary]
    assert torch.equal(adversary.delta[mask], torch.zeros(int(mask.sum())))  # exactly zero, after any scaling
    assert bool((adversary.delta[~mask] != 0).all())  # it trains the others
    assert adversary.stats["adv_neurotoxin_masked"] == float(mask.sum())
    assert all(bool((u.delta[mask] != 0).any()) for u in updates if not u.is_adversary)  # honest ones unmasked
    if attack.mode == "pgd":
        assert adversary.stats["adv_norm_before_scaling"] <= 0.3 * (1 + 1e-5)
    if attack.model_replacement:
        assert adversary.stats["adv_replacement_scale"] > 1


def test_before_any_global_step_the_attack_is_unmasked():
    plain, masked = EdgeCaseAttack(attack_every=1, measure_attacker=False), \
        EdgeCaseAttack(attack_every=1, measure_attacker=False, neurotoxin_ratio=0.3)
    deltas = []
    for attack in (plain, masked):
        run = make_run(attack, seed=2)
        _, updates = train_round(run, attack, round_idx=1, global_params=flat_params(run.task))
        deltas.append(next(u for u in updates if u.is_adversary))
    assert masked.neurotoxin_mask is None and deltas[1].stats["adv_neurotoxin_masked"] == 0.0
    assert torch.equal(deltas[0].delta, deltas[1].delta)  # round 1 of a run without history: the plain attack
    observe_step(masked, torch.ones(4))
    masked.on_fit_start(task=masked.task, data=make_run(plain).data, fabric=masked.fabric, seed=0)
    assert masked.neurotoxin_mask is None  # a new run starts without the last run's mask


def test_neurotoxin_through_the_cli_resumes_bitwise(tmp_path, capsys):
    out = str(tmp_path / "runs")
    common = ["fit", "--task", "toy", "--fl.rounds", "4", "--fl.checkpoint_every", "1", "--callbacks+=EdgeCaseAttack",
              "--callbacks.attack_every", "1", "--callbacks.neurotoxin_ratio", "0.1", "--log.logger", "csv",
              "--log.progress_bar", "false", "--num_threads", "1", "--accelerator", "cpu", "--out_dir", out]
    killer = ("--callbacks+=fl_test_callbacks.KillMidRound", "--callbacks.round_idx=3", "--callbacks.slot=1",
              f"--callbacks.marker={tmp_path / 'killed'}")
    # Only the killed run needs a process of its own; the others run here (no second start-up).
    assert run_cli(*common, *killer, "--name", "killed", cwd=tmp_path, check=False).returncode != 0
    assert (tmp_path / "killed").is_file()
    assert run_main(capsys, *common, "--name", "straight")[0] == 0
    assert run_main(capsys, "fit", "--resume", str(tmp_path / "runs" / "killed"))[0] == 0
    assert torch.equal(final_model(tmp_path / "runs" / "killed"), final_model(tmp_path / "runs" / "straight"))
    rows = read_metrics(tmp_path / "runs" / "straight")
    masked = [float(r["adv_neurotoxin_masked"]) for r in rows[1:]]
    assert masked[0] == 0.0 and all(m > 0 for m in masked[1:])  # no global step before round 1


# ----- lifespan -----

def curve(backdoor: list[float], adversaries: list[int]) -> pd.DataFrame:
    return pd.DataFrame({"round": range(len(backdoor)), "main_acc": 0.9, "backdoor_acc": backdoor,
                         "num_adversaries": adversaries})


def test_lifespan_by_hand():
    # Last attack in round 2 (0.8); below 0.4 first in round 5: 3 rounds.
    metrics = curve([0.0, 0.6, 0.8, 0.7, 0.41, 0.39, 0.1], [0, 1, 1, 0, 0, 0, 0])
    assert lifespan(metrics) == 3
    assert lifespan(curve([0.0, 0.6, 0.8, 0.7, 0.41, 0.4], [0, 1, 1, 0, 0, 0])) is None  # never below half
    assert lifespan(curve([0.0, 0.6, 0.8], [0, 0, 0])) is None  # never attacked
    assert lifespan(curve([0.0, 0.0, 0.5], [0, 1, 0])) == 0  # no backdoor at the last attack


def test_lifespan_with_a_control_uses_the_lift():
    # Binary fractions, so that the differences are exact.
    metrics = curve([0.25, 0.75, 0.875, 0.75, 0.6875, 0.625, 0.5], [0, 1, 1, 0, 0, 0, 0])
    control = curve([0.25, 0.25, 0.25, 0.375, 0.375, 0.375, 0.375], [0] * 7)
    # Lift 0.625 at round 2, then 0.375, 0.3125 (not below half), 0.25 at round 5: 3 rounds; the raw
    # accuracy (0.875 at round 2) never falls below 0.4375.
    assert lifespan(metrics, control) == 3 and lifespan(metrics) is None


def test_report_table_has_a_lifespan_column():
    def group(backdoor: list[float], adversaries: list[int]) -> Group:
        return Group({"k": len(backdoor)}, [RunResult("r", Path("r"), {}, curve(backdoor, adversaries))])

    table = markdown_table([group([0.0, 0.6, 0.8, 0.7, 0.41, 0.39, 0.1], [0, 1, 1, 0, 0, 0, 0]),
                            group([0.0, 0.9, 0.9], [0, 1, 0]), group([0.0, 0.1], [0, 0])], ["k"])
    header, _, *rows = table.splitlines()
    column = header.split(" | ").index("backdoor lifespan (rounds)")
    assert [row.split(" | ")[column] for row in rows] == ["3", "never", "—"]
    assert header.endswith("rounds to 50% backdoor (smoothed) |")  # the last column stays the last
