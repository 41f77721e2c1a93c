"""FLDetector (Zhang et al., KDD 2022): the L-BFGS prediction and distances against a dense float64
BFGS recursion, the 1-D k-means sums against brute force, the gap statistic, a planted attacker,
determinism, the state through a checkpoint file, a bad argument, and a CLI run killed and resumed.
"""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch
from cli_helpers import final_model, read_metrics, run_cli

from fl_lightning.aggregation import RoundContext
from fl_lightning.callbacks import FLDetector
from fl_lightning.callbacks.fldetector import gap_statistic_clusters, within_cluster_sums
from fl_lightning.config import ComponentError


def dense_bfgs(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The BFGS matrix from the pairs (oldest first) by the textbook recursion from `B_0 = σ I`, float64.

    `B <- B - B s s^T B / (s^T B s) + y y^T / (y^T s)`; the compact form of the paper is the same
    matrix (Byrd, Nocedal and Schnabel 1994, Theorem 2.2), so this checks it independently.
    """
    s_last, y_last = pairs[-1]
    b = float(y_last @ s_last / (s_last @ s_last)) * torch.eye(s_last.numel(), dtype=torch.float64)
    for s, y in pairs:
        bs = b @ s
        b = b - torch.outer(bs, bs) / (s @ bs) + torch.outer(y, y) / (y @ s)
    return b


def quadratic_round(w: torch.Tensor, hessian: torch.Tensor, ids: list[int], generator: torch.Generator,
                    attackers: frozenset[int] = frozenset(), push: torch.Tensor | None = None) -> torch.Tensor:
    """Client updates on `f(w) = w^T H w / 2` (a gradient step plus client noise); attackers add `push`."""
    deltas = -0.1 * (hessian @ w) + 0.02 * torch.randn(len(ids), w.numel(), generator=generator, dtype=w.dtype)
    for slot, client in enumerate(ids):
        if client in attackers:
            deltas[slot] += push
    return deltas


def spd(size: int, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    a = torch.randn(size, size, generator=generator, dtype=dtype)
    return a @ a.T / size + torch.eye(size, dtype=dtype)


def drive(rule: FLDetector, rounds: range, w: torch.Tensor, seed: int, n: int = 6, pool: int = 12,
          attackers: frozenset[int] = frozenset(), push: torch.Tensor | None = None):
    """Runs rounds of sampled clients through `rule`; yields (round, ids, global model, deltas, result)."""
    g = torch.Generator().manual_seed(seed)
    hessian = spd(w.numel(), g, w.dtype)
    for round_idx in rounds:
        ids = torch.randperm(pool, generator=g)[:n].tolist()
        deltas = quadratic_round(w, hessian, ids, g, attackers, push)
        rule.begin_round(RoundContext(round_idx, torch.tensor(ids), w.clone()))
        result = rule.aggregate(deltas, torch.ones(n, dtype=deltas.dtype), torch.Generator().manual_seed(round_idx))
        yield round_idx, ids, w.clone(), deltas, result
        w = w + result.update


def test_lbfgs_prediction_and_distances_match_a_dense_bfgs_matrix():
    # Window 2 over 7 rounds: the ring of 3 slots wraps twice. Every round is recomputed densely in float64.
    rule = FLDetector(window=2)
    models, updates, checked = [], [], 0
    for _, ids, w, deltas, result in drive(rule, range(1, 8), torch.zeros(8, dtype=torch.float64), seed=0):
        if len(models) >= 3:  # two complete pairs before this round: a prediction
            pairs = [(models[j + 1] - models[j], updates[j + 1] - updates[j]) for j in (-3, -2)]
            predicted = updates[-1] + dense_bfgs(pairs) @ (w - models[-1])  # ĝ_t = g_{t-1} + Ĥ v
            distance = (deltas - predicted).norm(dim=1)
            expected = distance * len(ids) / distance.sum()
            rows = torch.searchsorted(rule.client_ids, torch.tensor(ids))
            torch.testing.assert_close(rule.distances[rows, -1], expected, rtol=1e-9, atol=1e-12)
            checked += 1
        else:
            assert result.flagged.tolist() == [False] * len(ids) and rule.distances.numel() == 0  # no detection yet
        kept = ~result.flagged
        torch.testing.assert_close(result.update, deltas[kept].mean(dim=0), rtol=1e-12, atol=1e-14)  # FedAvg of kept
        models.append(w)
        updates.append(result.update)
    assert checked == 4 and int(rule.num_pairs) == 6


def test_scores_average_a_clients_last_window_of_distances():
    rule = FLDetector(window=3)
    rule.record(torch.tensor([5, 2]), torch.tensor([1.0, 2.0], dtype=torch.float64))
    rule.record(torch.tensor([5]), torch.tensor([3.0], dtype=torch.float64))
    # Client 5 twice in one round (a virtual attacker beside its twin): each score uses its own distance.
    scores = rule.record(torch.tensor([5, 2, 5]), torch.tensor([5.0, 4.0, 8.0], dtype=torch.float64))
    assert scores.tolist() == pytest.approx([(1 + 3 + 5) / 3, (2 + 4) / 2, (1 + 3 + 8) / 3])
    assert rule.client_ids.tolist() == [2, 5]
    assert rule.distances[1].tolist() == [3.0, 5.0, 8.0]  # the last three, in slot order
    assert rule.distances[0, 1:].tolist() == [2.0, 4.0] and math.isnan(rule.distances[0, 0])


def brute_force_within_sums(points: list[float], k: int) -> float:
    best = math.inf
    for labels in itertools.product(range(k), repeat=len(points)):
        total = 0.0
        for c in range(k):
            members = [p for p, label in zip(points, labels) if label == c]
            if members:
                mean = sum(members) / len(members)
                total += sum((p - mean) ** 2 for p in members)
        best = min(best, total)
    return best


def test_within_cluster_sums_by_hand_and_by_brute_force():
    sums = within_cluster_sums(torch.tensor([[0.0, 11.0, 1.0, 10.0]], dtype=torch.float64), 3)
    assert sums[0].tolist() == pytest.approx([101.0, 1.0, 0.5])  # mean 5.5; {0, 1} {10, 11}; one pair split
    points = torch.rand(3, 7, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    sums = within_cluster_sums(points, 3)
    for row, expected in zip(points.tolist(), sums.tolist()):
        assert expected == pytest.approx([brute_force_within_sums(row, k) for k in (1, 2, 3)], abs=1e-12)


def test_gap_statistic_tells_two_groups_from_one():
    g = torch.Generator().manual_seed(0)
    two_groups = torch.cat([0.1 + 0.01 * torch.rand(18, generator=g), 1.0 + 0.01 * torch.rand(2, generator=g)])
    assert gap_statistic_clusters(two_groups.double(), 10, 7, torch.Generator().manual_seed(1)) >= 2
    uniform = torch.linspace(0.5, 1.5, 20, dtype=torch.float64)
    assert gap_statistic_clusters(uniform, 10, 7, torch.Generator().manual_seed(1)) == 1
    assert gap_statistic_clusters(torch.ones(5, dtype=torch.float64), 10, 7, torch.Generator()) == 1  # identical


def test_a_planted_attacker_is_flagged_once_the_window_fills():
    # 40 clients, 10 a round; clients 0-3 add the same push every time (4x the client noise's norm).
    push = torch.zeros(200, dtype=torch.float64)
    push[:50] = 0.02 * 4 * math.sqrt(200 / 50)
    attackers = frozenset(range(4))
    rule = FLDetector(window=3)
    caught = missed = false_alarms = honest = 0
    for round_idx, ids, _, _, result in drive(rule, range(1, 26), torch.zeros(200, dtype=torch.float64), seed=1,
                                             n=10, pool=40, attackers=attackers, push=push):
        flagged = result.flagged.tolist()
        if round_idx <= 4:  # fewer than 3 pairs: no detection
            assert not any(flagged)
            continue
        for client, flag in zip(ids, flagged):
            if client in attackers:
                caught, missed = caught + flag, missed + (not flag)
            else:
                false_alarms, honest = false_alarms + flag, honest + 1
    assert caught / (caught + missed) >= 0.9 and false_alarms / honest <= 0.1


def test_deterministic_and_continues_bitwise_from_a_checkpoint_file(tmp_path):
    from fl_lightning.checkpoint import load_aggregator_state, save_checkpoint

    push = torch.full((300,), 0.05)
    make = functools.partial(FLDetector, window=2, kmeans_restarts=1)  # one k-means++ start: fast, still seeded
    runs = []
    for _ in range(2):
        rule = make()
        runs.append([(r.update, r.flagged) for *_, r in drive(rule, range(1, 10), torch.zeros(300), seed=2,
                                                             attackers=frozenset({1, 2}), push=push)])
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(*runs))
    assert any(flagged.any() for _, flagged in runs[0])  # detection took part

    straight = make()
    rounds = list(drive(straight, range(1, 10), torch.zeros(300), seed=2, attackers=frozenset({1, 2}), push=push))
    first = make()
    for _ in drive(first, range(1, 6), torch.zeros(300), seed=2, attackers=frozenset({1, 2}), push=push):
        pass
    path = save_checkpoint(tmp_path / "ckpt.safetensors", torch.zeros(1), {}, first.state_dict())
    resumed = make()
    resumed.load_state_dict(load_aggregator_state(path))
    for round_idx, ids, w, deltas, expected in rounds[5:]:
        resumed.begin_round(RoundContext(round_idx, torch.tensor(ids), w))
        result = resumed.aggregate(deltas, torch.ones(len(ids)), torch.Generator().manual_seed(round_idx))
        assert torch.equal(result.update, expected.update) and torch.equal(result.flagged, expected.flagged)
    for name, value in straight.state_dict().items():  # the histories hold NaN for distances not yet seen
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(ValueError, match="FLDetector window=3, but the checkpoint holds 2 pairs"):
        FLDetector(window=3).load_state_dict(straight.state_dict())


def test_a_bad_argument_is_refused_in_one_line():
    with pytest.raises(ComponentError, match=r"^FLDetector window must be an integer >= 1, got 0$"):
        FLDetector(window=0)
    with pytest.raises(ValueError, match="call begin_round before aggregate"):
        FLDetector().aggregate(torch.zeros(3, 2), torch.ones(3), torch.Generator())


def test_through_the_cli_detects_and_resumes_bitwise(tmp_path):
    # Window 2: detection from round 4 on; the kill in round 5 resumes with the score histories from round 4.
    common = ["fit", "--task", "toy", "--fl.rounds", "6", "--fl.checkpoint_every", "1", "--aggregator", "FLDetector",
              "--aggregator.window", "2", "--callbacks+=EdgeCaseAttack", "--callbacks.attack_every", "1",
              "--callbacks.model_replacement", "true", "--log.logger", "csv", "--log.progress_bar", "false",
              "--num_threads", "1"]
    run_cli(*common, "--name", "straight", cwd=tmp_path)
    rows = read_metrics(tmp_path / "runs" / "straight")[1:]
    assert all(row["detection_tpr"] != "" and row["detection_fpr"] != "" for row in rows)
    assert all(float(row["detection_tpr"]) + float(row["detection_fpr"]) == 0 for row in rows[:3])  # warm-up
    assert any(float(row["detection_tpr"]) > 0 for row in rows[3:])  # the boosted attacker is caught
    killer = ("--callbacks+=fl_test_callbacks.KillMidRound", "--callbacks.round_idx=5", "--callbacks.slot=1",
              f"--callbacks.marker={tmp_path / 'killed'}")
    assert run_cli(*common, *killer, "--name", "killed", cwd=tmp_path, check=False).returncode != 0
    run_cli("fit", "--resume", str(tmp_path / "runs" / "killed"), cwd=tmp_path)
    assert torch.equal(final_model(tmp_path / "runs" / "killed"), final_model(tmp_path / "runs" / "straight"))
