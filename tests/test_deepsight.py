"""DeepSight (Rieger et al., NDSS 2022): NEUPs, threshold exceedings, the classification boundary and DDifs by
hand, the cluster decision and the clipped mean, a planted one-neuron backdoor flagged, determinism, refused
arguments, and a run through the CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from cli_helpers import read_metrics, run_cli
from torch import nn

from fl_lightning.aggregation import RoundContext
from fl_lightning.callbacks import DeepSight
from fl_lightning.callbacks.deepsight import (
    accepted_clusters,
    class_log_probs,
    classification_labels,
    cluster_distances,
    division_differences,
    normalised_update_energies,
    threshold_exceedings,
)
from fl_lightning.config import ComponentError
from fl_lightning.hooks import FLCallback
from fl_lightning.params import flat_params
from fl_lightning.server import ServerModel, output_layer


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only contend
    yield
    torch.set_num_threads(threads)


def server_around(model: nn.Module, inputs: int) -> ServerModel:
    """A `ServerModel` of a bare module: no Fabric, no server data; random inputs are standard normal floats."""
    return ServerModel(fabric=None, task=model, client=None, root_inputs=None, root_targets=None,
                       probe_like=torch.zeros(2, inputs))


# ----- NEUPs, threshold exceedings, classification boundary -----

def test_neups_and_threshold_exceedings_by_hand():
    # Flat vector: 2 other parameters, then the output layer's weight [3, 2] and bias [3].
    weight, bias = slice(2, 8), slice(8, 11)
    deltas = torch.tensor([
        [5.0, 5.0, 1.0, -1.0, 0.0, 2.0, 0.0, 0.0, 1.0, 0.0, 0.5],   # energies 3, 2, 0.5
        [0.0, 9.0, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],    # energies 1, 0, 0: one neuron
        [0.0, 0.0, 1.0, 0.0, 0.0, -1.0, 0.5, 0.0, 0.0, 0.0, 0.5],   # energies 1, 1, 1
        [7.0, 7.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],    # the output layer unchanged
    ])
    neups = normalised_update_energies(deltas, weight, bias, 3)
    # Squared energies normalised to sum 1: 9, 4, 0.25 over 13.25.
    expected = [[9 / 13.25, 4 / 13.25, 0.25 / 13.25], [1.0, 0.0, 0.0], [1 / 3] * 3, [1 / 3] * 3]
    torch.testing.assert_close(neups, torch.tensor(expected, dtype=torch.float64))
    # ξ = max(0.01, 1/3): NEUPs reaching a third of the largest. 0.25 < 9 / 3 < 4: two for the first update.
    assert threshold_exceedings(neups).tolist() == [2, 1, 3, 3]


def test_threshold_factor_is_one_percent_for_wide_layers():
    neups = torch.tensor([[0.5] + [0.0051] * 98 + [0.0049] + [0.0] * 100]).double()  # P = 200: ξ = 0.01
    assert threshold_exceedings(neups).tolist() == [1 + 98]  # 0.0051 >= 0.005 > 0.0049


def test_classification_boundary_is_half_the_median():
    # Median 9, boundary 4.5; for an even count the median is the mean of the middle two (5, boundary 2.5).
    assert classification_labels(torch.tensor([10, 10, 5, 4, 9])).tolist() == [False, False, False, True, False]
    assert classification_labels(torch.tensor([2, 4, 6, 8])).tolist() == [True, False, False, False]
    assert classification_labels(torch.tensor([2, 4, 4])).tolist() == [True, False, False]  # 2 <= 4 / 2: suspicious


# ----- DDifs -----

def test_ddifs_of_a_linear_model_by_hand():
    torch.manual_seed(0)
    model = nn.Linear(2, 3)
    server = server_around(model, 2)
    global_params = flat_params(model)  # weight [3, 2] then bias [3]
    deltas = torch.tensor([[0.5, 0.0, 0.0, -0.5, 0.0, 0.0, 1.0, 0.0, 0.0], [0.0] * 9])
    ddifs = division_differences(server, global_params, deltas, num_samples=4, num_seeds=2,
                                 generator=torch.Generator().manual_seed(7))
    # The same draws, one set per seed, and softmax probabilities by hand.
    draws = torch.Generator().manual_seed(7)
    inputs = [torch.randn((4, 2), generator=draws).tolist() for _ in range(2)]

    def probabilities(params: list[float], x: list[float]) -> list[float]:
        logits = [params[2 * k] * x[0] + params[2 * k + 1] * x[1] + params[6 + k] for k in range(3)]
        exps = [math.exp(z) for z in logits]
        return [e / sum(exps) for e in exps]

    g = global_params.tolist()
    for seed in range(2):
        for i in range(2):
            local = [a + b for a, b in zip(g, deltas[i].tolist())]
            ratios = [[pl / pg for pl, pg in zip(probabilities(local, x), probabilities(g, x))] for x in inputs[seed]]
            expected = [sum(r[k] for r in ratios) / 4 for k in range(3)]
            assert ddifs[seed, i].tolist() == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(ddifs[:, 1], torch.ones(2, 3, dtype=torch.float64))  # the global model itself: ratio 1


def test_one_logit_is_binary_and_sequence_outputs_are_rows():
    z = torch.tensor([0.0, 2.0])
    expected = torch.tensor([[0.5, 0.5], [1 / (1 + math.e ** 2), 1 / (1 + math.e ** -2)]], dtype=torch.float64)
    torch.testing.assert_close(class_log_probs(z).exp(), expected)
    assert class_log_probs(torch.zeros(2, 5, 7)).shape == (10, 7)


# ----- cluster decision -----

def test_cluster_distances_and_the_share_of_suspicious_models_by_hand():
    labels = np.array([0, 0, 0, 1, 1, -1, -1])
    distances = cluster_distances(labels)
    assert distances[0].tolist() == [0, 0, 0, 1, 1, 1, 1] and distances[5].tolist() == [1, 1, 1, 1, 1, 0, 1]
    suspicious = torch.tensor([False, False, True, True, False, True, False])
    # Cluster 0: 1 of 3 suspicious, not below τ = 1/3: left out; cluster 1: 1 of 2; noise: each on its own label.
    assert accepted_clusters(labels, suspicious, 1 / 3).tolist() == [False] * 6 + [True]
    assert accepted_clusters(labels, suspicious, 0.4).tolist() == [True] * 3 + [False, False, False, True]


# ----- the whole rule -----

def backdoor_round(seed: int, n: int = 10, attackers: tuple[int, ...] = (2, 7)):
    """A tiny MLP, honest updates spread over every parameter, and attackers moving one output neuron."""
    generator = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 10))
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    server = server_around(model, 8)
    global_params = flat_params(model)
    weight, bias, _ = server.output_layer()
    deltas = 0.05 * torch.randn(n, global_params.numel(), generator=generator)
    target = 3
    for a in attackers:  # small everywhere, large on the target label's weights and bias
        deltas[a] = 0.005 * torch.randn(global_params.numel(), generator=generator)
        deltas[a, weight.start + 16 * target: weight.start + 16 * (target + 1)] += 0.3
        deltas[a, bias.start + target] += 0.5
    return server, global_params, deltas, list(attackers)


@pytest.mark.parametrize("seed", range(3))
def test_a_planted_one_neuron_backdoor_is_flagged_and_the_rest_clipped_and_averaged(seed):
    server, global_params, deltas, attackers = backdoor_round(seed)
    rule = DeepSight(num_samples=500)
    rule.begin_round(RoundContext(1, torch.arange(10), global_params, server))
    result = rule.aggregate(deltas, torch.ones(10), torch.Generator().manual_seed(seed))
    assert result.flagged[attackers].all() and int((~result.flagged).sum()) >= 5
    accepted = (~result.flagged).nonzero().flatten().tolist()
    norms = deltas.double().norm(dim=1)
    bound = float(norms.sort().values[4:6].mean())  # the median of ten norms, over all updates
    expected = sum(deltas[i].double() * min(1.0, bound / float(norms[i])) for i in accepted) / len(accepted)
    torch.testing.assert_close(result.update.double(), expected, rtol=1e-5, atol=1e-7)
    assert result.client_weights.tolist() == pytest.approx([0.0 if f else 1 / len(accepted) for f in result.flagged])


def test_same_seed_same_result():
    server, global_params, deltas, _ = backdoor_round(5)
    results = []
    for _ in range(2):
        rule = DeepSight(num_samples=300, num_seeds=2)
        rule.begin_round(RoundContext(4, torch.arange(10), global_params, server))
        results.append(rule.aggregate(deltas, torch.ones(10), torch.Generator().manual_seed(11)))
    assert torch.equal(results[0].update, results[1].update) and torch.equal(results[0].flagged, results[1].flagged)
    ddifs = [division_differences(server, global_params, deltas, 300, 2, torch.Generator().manual_seed(s))
             for s in (11, 11, 12)]
    assert torch.equal(ddifs[0], ddifs[1]) and not torch.equal(ddifs[0], ddifs[2])


@pytest.mark.parametrize(("make", "message"), [
    (lambda: DeepSight(num_samples=0), r"DeepSight num_samples must be an integer >= 1, got 0"),
    (lambda: DeepSight(num_seeds=1.5), r"DeepSight num_seeds must be an integer >= 1, got 1.5"),
    (lambda: DeepSight(tau=0.0), r"DeepSight tau must be in \(0, 1\]"),
    (lambda: DeepSight(tau=float("nan")), r"DeepSight tau must be in \(0, 1\]"),
])
def test_bad_arguments_are_refused_in_one_line(make, message):
    with pytest.raises(ComponentError, match=message) as error:
        make()
    assert "\n" not in str(error.value)


def test_without_the_tasks_model_it_refuses():
    rule = DeepSight()
    with pytest.raises(ValueError, match=r"needs the task's model \(RoundContext.server\)"):
        rule.aggregate(torch.zeros(3, 4), torch.ones(3), torch.Generator())
    rule.begin_round(RoundContext(1, torch.arange(3), torch.zeros(4)))
    with pytest.raises(ValueError, match="needs the task's model"):
        rule.aggregate(torch.zeros(3, 4), torch.ones(3), torch.Generator())


class OneNeuronBackdoor(FLCallback):
    """Keeps only the target label's neuron in the attackers' output-layer updates (loaded by class path in the CLI
    test): the shape DeepSight's threshold exceedings look for."""

    def __init__(self, target: int = 0) -> None:
        self.target = target

    def on_fit_start(self, task, data, fabric, seed) -> None:
        self.layer = output_layer(task)

    def on_client_end(self, ctx, update) -> None:
        if ctx.is_adversary:
            weight, bias, num_outputs = self.layer
            rows = update.delta[weight].view(num_outputs, -1)  # a view: changes land in the update
            others = [k for k in range(num_outputs) if k != self.target]
            rows[others] = 0.0
            update.delta[bias][others] = 0.0


def test_deepsight_through_the_cli_flags_a_one_neuron_update_and_reports_detection(tmp_path):
    run_cli("fit", "--task", "toy", "--fl.rounds", "3", "--fl.clients_per_round", "8", "--aggregator", "DeepSight",
            "--aggregator.num_samples", "500", "--callbacks+=EdgeCaseAttack", "--callbacks.attack_every", "1",
            "--callbacks+=test_deepsight.OneNeuronBackdoor", "--log.logger", "csv", "--log.progress_bar", "false",
            "--num_threads", "1", "--name", "deepsight", cwd=tmp_path)
    rows = [row for row in read_metrics(tmp_path / "runs" / "deepsight") if row.get("detection_fpr")]
    assert len(rows) == 3  # every round reports detection
    # One attacker among eight updates, its output-layer update on the backdoor label alone: labelled suspicious
    # each round, and left out where its cluster is (at least once; in round 1 it may share a cluster with honest
    # updates, with a suspicious share of 1/4 < τ).
    tpr = [float(row["detection_tpr"]) for row in rows]
    assert sum(tpr) >= 1 and all(t in (0.0, 1.0) for t in tpr)
    assert all(float(row["adversary_weight"]) == 0.0 for row, t in zip(rows, tpr) if t == 1.0)
