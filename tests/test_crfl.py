"""CRFL (Xie et al., ICML 2021): the clipped and noised global model, parameter smoothing and the certified radius.

Hand-computed aggregation and radius, the norm bound as a property over random seeds, monotonicity of
the radius, the vote of a tiny linear model, and one `fit` + `validate --smoothing_samples` run through
the CLI (in this process: a CLI start costs seconds).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml
from cli_helpers import run_main
from scipy.stats import beta

from fl_lightning.aggregation import RoundContext
from fl_lightning.callbacks import CRFL, GeometricMedian
from fl_lightning.callbacks.crfl import (
    certified_radius,
    certify,
    clopper_pearson_lower,
    contraction,
    smoothed_vote,
)
from fl_lightning.config import ComponentError, ConfigError, FLArgs


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def crfl_round(rule: CRFL, global_params: torch.Tensor, deltas: torch.Tensor, counts: torch.Tensor,
               round_idx: int = 1, seed: int = 0):
    rule.begin_round(RoundContext(round_idx, torch.arange(deltas.shape[0]), global_params))
    return rule(deltas, counts, gen(seed))


# ----- training: clip the new global model, then noise -----

def test_crfl_clips_the_new_global_model_by_hand():
    w = torch.tensor([3.0, 4.0])  # |w| = 5
    deltas, counts = torch.tensor([[1.0, 0.0], [3.0, 0.0]]), torch.tensor([1.0, 3.0])  # FedAvg: [2.5, 0]
    # round 1: ρ_1 = min(10, 2 + 1 * 1) = 3; w' = [5.5, 4], |w'| = sqrt(46.25), clipped to norm 3
    result = crfl_round(CRFL(norm_bound=10.0, bound_start=2.0, bound_growth=1.0, stddev=0.0), w, deltas, counts)
    clipped = torch.tensor([5.5, 4.0]) * (3.0 / math.sqrt(46.25))
    torch.testing.assert_close(w + result.update, clipped)
    assert result.noise is None and result.client_weights.tolist() == [0.25, 0.75]
    # the cap: ρ = min(2.5, 3) = 2.5
    capped = crfl_round(CRFL(norm_bound=2.5, bound_start=2.0, bound_growth=1.0, stddev=0.0), w, deltas, counts)
    torch.testing.assert_close(w + capped.update, torch.tensor([5.5, 4.0]) * (2.5 / math.sqrt(46.25)))
    # round 5: ρ_5 = 7 > |w'|: the FedAvg step, bitwise
    within = crfl_round(CRFL(norm_bound=10.0, bound_start=2.0, bound_growth=1.0, stddev=0.0), w, deltas, counts, 5)
    assert within.update.tolist() == [2.5, 0.0]


def test_crfl_noise_is_stddev_times_the_rounds_draw():
    w, deltas = torch.zeros(3), torch.tensor([[0.3, 0.0, -0.4]])
    result = crfl_round(CRFL(stddev=0.5), w, deltas, torch.ones(1), seed=7)
    assert torch.equal(result.noise, 0.5 * torch.randn(3, generator=gen(7)))
    assert result.update.tolist() == pytest.approx([0.3, 0.0, -0.4])  # |w'| = 0.5 < ρ_1 = 2.1: not clipped
    again = crfl_round(CRFL(stddev=0.5), w, deltas, torch.ones(1), seed=7)
    assert torch.equal(again.noise, result.noise)
    wide = crfl_round(CRFL(stddev=0.03), torch.zeros(200_000), torch.zeros(2, 200_000), torch.ones(2), seed=3)
    assert float(wide.noise.std()) == pytest.approx(0.03, rel=0.01)


@pytest.mark.parametrize("seed", range(5))
def test_the_new_global_model_never_exceeds_the_bound_before_noise(seed):
    g = gen(seed)
    w = torch.randn(1000, generator=g) * float(torch.rand(1, generator=g) * 0.2)  # |w| from 0 to ~6
    deltas = torch.randn(6, 1000, generator=g) * 0.1
    counts = torch.randint(1, 50, (6,), generator=g).float()
    for round_idx in (1, 10, 40, 200):
        rule = CRFL(stddev=0.0)
        new = w + crfl_round(rule, w, deltas, counts, round_idx).update
        assert float(new.double().norm()) <= rule.bound(round_idx) * (1 + 1e-6)
        unclipped = w + (counts / counts.sum()) @ deltas
        if float(unclipped.norm()) <= rule.bound(round_idx):  # within the bound: the inner step unchanged
            torch.testing.assert_close(new, unclipped)


def test_crfl_wraps_an_inner_rule_and_checks_its_arguments():
    w, deltas = torch.zeros(2), torch.tensor([[0.0, 1.0], [0.0, 1.2], [0.0, 50.0]])
    result = crfl_round(CRFL(inner=GeometricMedian(), stddev=0.0), w, deltas, torch.ones(3))
    assert float(result.update.norm()) < 1.5  # the geometric median ignores the far update
    with pytest.raises(ComponentError, match="CRFL stddev must be a finite number >= 0"):
        CRFL(stddev=-1.0)
    with pytest.raises(ConfigError, match="--fl.server_lr=0.5"):
        CRFL().check_run(FLArgs(rounds=2, num_clients=4, clients_per_round=2, server_lr=0.5))


# ----- test time: the radius, the bound on p_A, the vote -----

RADIUS_SETTINGS = dict(sigma=0.01, smoothing_sigma=0.01, bounds=[0.01, 0.02], attacker_weights=[0.1, 0.2],
                       scale=10.0, local_steps=5.0, lr=0.1, lipschitz=2.0, poison_fraction=0.05)


def test_certified_radius_by_hand():
    # p_A = 0.9, p_B = 0.1: (√0.9 - √0.1)^2 = 0.4, -ln(0.6) = 0.5108256.
    # γ τ η L_Z q = 10 * 5 * 0.1 * 2 * 0.05 = 0.5; R Σ (p_i 0.5)^2 = 2 * (0.05^2 + 0.1^2) = 0.025.
    # contraction: (2Φ(0.01 / 0.01) - 1) (2Φ(0.02 / 0.01) - 1) = 0.6826895 * 0.9544997.
    expected = math.sqrt(-math.log(0.6) * 0.01 ** 2 / (2 * 0.025 * 0.6826895 * 0.9544997))
    assert expected == pytest.approx(0.039596, rel=1e-4)
    assert float(certified_radius(0.9, 0.1, **RADIUS_SETTINGS)) == pytest.approx(expected, rel=1e-6)
    assert contraction([0.01, 0.02], 0.01, 0.01) == pytest.approx(0.6826895 * 0.9544997, rel=1e-6)
    radii = certified_radius(np.array([0.5, 0.3, 0.9]), np.array([0.5, 0.7, 0.1]), **RADIUS_SETTINGS)
    assert radii[0] == 0.0 and radii[1] == 0.0 and radii[2] == pytest.approx(expected)  # p_A <= p_B: abstained


def test_certified_radius_grows_with_p_a_and_sigma():
    p_a = np.linspace(0.51, 0.999, 50)
    radii = certified_radius(p_a, 1 - p_a, **RADIUS_SETTINGS)
    assert (np.diff(radii) > 0).all()
    for key in ("sigma", "smoothing_sigma"):
        by_sigma = [float(certified_radius(0.8, 0.2, **{**RADIUS_SETTINGS, key: s})) for s in (0.005, 0.01, 0.02)]
        assert by_sigma[0] < by_sigma[1] < by_sigma[2]
    more_rounds = certified_radius(0.8, 0.2, **{**RADIUS_SETTINGS, "bounds": [0.01] * 5 + [0.02]})
    assert more_rounds > certified_radius(0.8, 0.2, **RADIUS_SETTINGS)  # every later round contracts the attack


def test_clopper_pearson_lower_bound():
    assert clopper_pearson_lower(np.array([20]), 20, 0.001)[0] == pytest.approx(0.001 ** (1 / 20))
    assert clopper_pearson_lower(np.array([0]), 20, 0.001)[0] == 0.0
    assert clopper_pearson_lower(np.array([13]), 20, 0.05)[0] == pytest.approx(beta.ppf(0.05, 13, 8))


def test_smoothed_vote_of_a_tiny_linear_model():
    inputs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # the third sits on the decision boundary
    params = torch.tensor([1.0, 0.0, 0.0, 1.0])  # W = I: class = argmax(x)

    def predict(flat: torch.Tensor) -> torch.Tensor:
        return (inputs @ flat.view(2, 2).T).argmax(dim=1)

    exact = smoothed_vote(predict, params, 0.0, 10, gen())
    assert exact.tolist() == [[10, 0], [0, 10], [10, 0]]  # σ = 0: every model is w_T (ties: class 0)
    counts = smoothed_vote(predict, params, 0.5, 400, gen(1))
    assert counts.sum(dim=1).tolist() == [400] * 3 and torch.equal(counts, smoothed_vote(predict, params, 0.5, 400,
                                                                                          gen(1)))
    assert counts[0, 0] > 300 and counts[1, 1] > 300 and 120 < counts[2, 0] < 280  # the boundary point splits
    top, p_a = certify(counts, 0.001)
    assert top.tolist()[:2] == [0, 1] and (p_a[:2] > 0.5).all() and p_a[2] < 0.5  # the boundary point abstains
    assert p_a[0] == pytest.approx(beta.ppf(0.001, int(counts[0, 0]), 400 - int(counts[0, 0]) + 1))


def test_run_radius_takes_the_threat_model_from_the_run():
    from types import SimpleNamespace

    from fl_lightning.callbacks.crfl import default_lipschitz, run_radius

    data = SimpleNamespace(partition=SimpleNamespace(sizes=lambda: torch.tensor([40, 60])))  # mean 50 examples
    config = {"aggregator": {"class_path": "fl_lightning.callbacks.CRFL", "init_args": {"stddev": 0.02}},
              "fl": {"clients_per_round": 5}, "client": {"local_epochs": 2, "batch_size": 16, "lr": 0.1}}
    options = dict(attack_round=None, attackers=1, weight=None, scale=1.0, poison_fraction=0.05, local_steps=None,
                   lr=None, lipschitz=None)
    radius = run_radius(config, 5, data, 0.01, **options)  # t_adv = 4: ρ_4 = 2.4, ρ_5 = 2.5
    expected = certified_radius(0.9, 0.1, sigma=0.02, smoothing_sigma=0.01, bounds=[2.5], attacker_weights=[0.2],
                                scale=1.0, local_steps=2 * 4, lr=0.1, lipschitz=default_lipschitz(2.4),
                                poison_fraction=0.05)
    assert radius(np.array([0.9]))[0] == pytest.approx(float(expected))
    assert run_radius(config, 1, data, 0.01, **options) is None  # no round before the first to attack
    assert run_radius({**config, "aggregator": None}, 5, data, 0.01, **options) is None  # not trained with CRFL
    with pytest.raises(ConfigError, match="--certify_attack_round=5: must be in 1..4"):
        run_radius(config, 5, data, 0.01, **{**options, "attack_round": 5})


# ----- through the CLI -----

@pytest.fixture(scope="module")
def crfl_run(tmp_path_factory):
    from fl_lightning.__main__ import main

    out = tmp_path_factory.mktemp("crfl")
    main(["fit", "--task", "toy", "--aggregator", "CRFL", "--aggregator.stddev", "0.005", "--fl.rounds", "3",
          "--log.logger", "csv", "--log.progress_bar", "false", "--num_threads", "1", "--accelerator", "cpu",
          "--out_dir", str(out / "runs"), "--name", "crfl"])
    return out / "runs" / "crfl"


def test_fit_with_crfl_then_validate_with_smoothing(crfl_run, capsys):
    from fl_lightning.orchestrator import validate

    config = yaml.safe_load((crfl_run / "config.yaml").read_text())["aggregator"]
    assert config["class_path"] == "fl_lightning.callbacks.CRFL" and config["init_args"]["stddev"] == 0.005
    code, out, err = run_main(capsys, "validate", "--checkpoint", str(crfl_run), "--smoothing_samples", "20",
                              "--smoothing_sigma", "0.005", "--accelerator", "cpu")
    assert code == 0, err
    for name in ("smoothed_main_acc", "smoothed_backdoor_acc", "certified_main_acc", "certified_radius_mean"):
        assert name in out
    first = validate(checkpoint=str(crfl_run), accelerator="cpu", smoothing_samples=20, smoothing_sigma=0.005)
    second = validate(checkpoint=str(crfl_run), accelerator="cpu", smoothing_samples=20, smoothing_sigma=0.005)
    first.pop("eval_seconds"), second.pop("eval_seconds")
    assert first == second  # the noisy models come from the run's seed
    assert first["certified_main_acc"] <= first["smoothed_main_acc"] and first["smoothed_main_acc"] > 0.5
    assert first["certified_radius_mean"] > 0  # trained with CRFL: a positive radius where certified


def test_a_bad_smoothing_option_stops_with_one_line(crfl_run, capsys):
    code, _, err = run_main(capsys, "validate", "--checkpoint", str(crfl_run), "--smoothing_alpha", "1.5")
    assert code == 2 and err.strip().count("\n") == 0 and "--smoothing_alpha must be in (0, 1), got 1.5" in err
