"""Defenses: norm clipping, weak DP, Krum, Multi-Krum, RFA, coordinate median and trimmed mean.

Hand-computed numbers for every rule, robustness properties over random seeds, agreement with a
brute-force geometric median and with numpy transcriptions of the reference code, and two runs
through the CLI.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml
from cli_helpers import final_model, read_metrics, run_cli, run_main

from fl_lightning import kernels
from fl_lightning.aggregation import Aggregate, FedAvg
from fl_lightning.callbacks import (
    CoordinateMedian,
    GeometricMedian,
    Krum,
    MultiKrum,
    NormClipping,
    TrimmedMean,
    WeakDP,
)
from fl_lightning.callbacks.clipping import clip_to_norm
from fl_lightning.callbacks.krum import krum_scores
from fl_lightning.kernels import gram_matrix, pairwise_sq_distances, row_norms

# Five updates on a line, shifted by a constant (distances ignore it): x = 0, 1, 2, 4, 10.
LINE = torch.tensor([[0.0, 1.0, -1.0], [1.0, 1.0, -1.0], [2.0, 1.0, -1.0], [4.0, 1.0, -1.0], [10.0, 1.0, -1.0]])
LINE_COUNTS = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----- norm clipping and weak DP -----

def test_clip_to_norm_hand_computed():
    # arrange: norms 10 and 1 against a bound of 2
    deltas = torch.tensor([[6.0, 8.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    before = deltas.clone()
    # act
    clipped = clip_to_norm(deltas, 2.0)
    # assert: [6, 8] / (10 / 2) = [1.2, 1.6]; the small row is untouched bit for bit; the input is not changed
    torch.testing.assert_close(clipped[0], torch.tensor([1.2, 1.6, 0.0, 0.0]))
    assert torch.equal(clipped[1], deltas[1]) and torch.equal(deltas, before)
    assert clip_to_norm(deltas, 10.0) is deltas  # nothing to clip: no copy


def test_clipping_leaves_small_updates_alone_and_clips_large_ones_to_the_bound():
    g = gen(1)
    directions = torch.randn(40, 1000, generator=g)
    norms = torch.logspace(-2, 2, 40)  # 0.01 .. 100 around a bound of 1.5
    deltas = directions / directions.norm(dim=1, keepdim=True) * norms[:, None]
    clipped = clip_to_norm(deltas, 1.5)
    small = deltas.norm(dim=1) <= 1.5
    assert torch.equal(clipped[small], deltas[small])
    torch.testing.assert_close(clipped[~small].norm(dim=1), torch.full(((~small).sum(),), 1.5), rtol=1e-6, atol=0)
    cosine = torch.nn.functional.cosine_similarity(clipped[~small], deltas[~small], dim=1)
    torch.testing.assert_close(cosine, torch.ones_like(cosine))


def test_clipping_is_exact_at_millions_of_parameters():
    # a single float32 accumulation over 3M values would be off by ~1e-4; the blocked norms are not
    g = gen(11)
    deltas = torch.randn(2, 3_000_003, generator=g) * 0.01 + 0.005
    norms = deltas.double().norm(dim=1)
    torch.testing.assert_close(row_norms(deltas).double(), norms, rtol=1e-7, atol=0)
    clipped = clip_to_norm(deltas, 1.0)
    torch.testing.assert_close(clipped.double().norm(dim=1), torch.ones(2, dtype=torch.float64), rtol=1e-6, atol=0)


def test_norm_clipping_then_fedavg_hand_computed():
    deltas = torch.tensor([[6.0, 8.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    result = NormClipping(norm_bound=2.0)(deltas, torch.tensor([1.0, 3.0]), gen())
    # 0.25 * [1.2, 1.6, 0, 0] + 0.75 * [0, 0, 1, 0]
    torch.testing.assert_close(result.update, torch.tensor([0.3, 0.4, 0.75, 0.0]))
    torch.testing.assert_close(result.client_weights, torch.tensor([0.25, 0.75]))
    assert isinstance(NormClipping().inner, FedAvg)


def test_norm_clipping_fast_path_equals_fedavg_of_the_clipped_updates():
    # the FedAvg inner folds the clip factors into the weights instead of copying the clipped rows
    deltas, counts = torch.randn(8, 5000, generator=gen(11)) * 0.05, torch.arange(1.0, 9.0)
    deltas[2] *= 100  # one far above the bound
    result = NormClipping(norm_bound=1.0)(deltas, counts, gen())
    expected = FedAvg()(clip_to_norm(deltas, 1.0), counts, gen())
    torch.testing.assert_close(result.update, expected.update, rtol=1e-6, atol=1e-8)
    assert torch.equal(result.client_weights, expected.client_weights)


def test_norm_clipping_wraps_any_inner_aggregator():
    # rows of norm 5, 1 and 0.5 clipped to 1: [0.6, 0.8], [1, 0], [0, 0.5]; coordinate medians 0.6 and 0.5
    deltas = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 0.5]])
    result = NormClipping(norm_bound=1.0, inner=CoordinateMedian())(deltas, torch.ones(3), gen())
    torch.testing.assert_close(result.update, torch.tensor([0.6, 0.5]))
    assert result.client_weights is None


def test_weak_dp_hand_computed():
    deltas = torch.tensor([[6.0, 8.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    result = WeakDP(norm_bound=2.0, stddev=0.5)(deltas, torch.tensor([1.0, 3.0]), gen(7))
    # the clipped mean, and apart from it 0.5 * N(0, 1) drawn from the round's generator
    torch.testing.assert_close(result.update, torch.tensor([0.3, 0.4, 0.75, 0.0]))
    torch.testing.assert_close(result.noise, 0.5 * torch.randn(4, generator=gen(7)))
    torch.testing.assert_close(result.client_weights, torch.tensor([0.25, 0.75]))
    again = WeakDP(norm_bound=2.0, stddev=0.5)(deltas, torch.tensor([1.0, 3.0]), gen(7))
    other_round = WeakDP(norm_bound=2.0, stddev=0.5)(deltas, torch.tensor([1.0, 3.0]), gen(8))
    assert torch.equal(result.noise, again.noise) and not torch.equal(result.noise, other_round.noise)


def test_weak_dp_noise_has_the_asked_standard_deviation_whatever_the_server_step():
    deltas = torch.zeros(3, 1_000_000)
    aggregate = WeakDP(norm_bound=1.0, stddev=0.025)(deltas, torch.ones(3), gen(3))
    for server_lr in (1.0, 0.1, 3.0):
        model = torch.zeros(1_000_000)
        aggregate.apply_(model, server_lr)
        # the std of 1e6 draws is within 0.1% of sigma with overwhelming probability; 1% leaves room
        assert abs(model.std().item() - 0.025) < 0.025 * 0.01, server_lr
        assert abs(model.mean().item()) < 5 * 0.025 / math.sqrt(1_000_000)


def test_apply_steps_by_server_lr_then_adds_the_noise_unscaled():
    model = torch.tensor([1.0, 1.0])
    Aggregate(update=torch.tensor([2.0, 4.0]), client_weights=None, noise=torch.tensor([0.5, -0.5])).apply_(model, 0.5)
    assert torch.equal(model, torch.tensor([2.5, 2.5]))  # 1 + 0.5 * 2 + 0.5, 1 + 0.5 * 4 - 0.5


def test_weak_dp_around_weak_dp_adds_both_noises():
    deltas = torch.zeros(2, 1000)
    outer = WeakDP(norm_bound=1.0, stddev=0.3, inner=WeakDP(norm_bound=1.0, stddev=0.4))(deltas, torch.ones(2), gen(5))
    generator = gen(5)
    inner_noise = 0.4 * torch.randn(1000, generator=generator)  # the inner draws first
    torch.testing.assert_close(outer.noise, 0.3 * torch.randn(1000, generator=generator) + inner_noise)


def test_weak_dp_without_noise_is_norm_clipping():
    deltas, counts = torch.randn(6, 100, generator=gen(2)) * 3, torch.arange(1.0, 7.0)
    clipped = NormClipping(norm_bound=2.0)(deltas, counts, gen())
    noiseless = WeakDP(norm_bound=2.0, stddev=0.0)(deltas, counts, gen())
    assert torch.equal(clipped.update, noiseless.update) and noiseless.noise is None


# ----- Krum and Multi-Krum -----

def test_pairwise_sq_distances_hand_computed():
    dists = pairwise_sq_distances(LINE)
    expected = torch.tensor([[0, 1, 4, 16, 100], [1, 0, 1, 9, 81], [4, 1, 0, 4, 64], [16, 9, 4, 0, 36],
                             [100, 81, 64, 36, 0]], dtype=torch.float64)
    torch.testing.assert_close(dists, expected)
    twins = pairwise_sq_distances(torch.tensor([[0.1, 0.2, 0.3], [0.1, 0.2, 0.3]]))
    assert torch.equal(twins, torch.zeros(2, 2, dtype=torch.float64))  # clamped at 0, never negative


def test_krum_scores_hand_computed():
    # f = 1, n = 5: each score sums the n - f - 2 = 2 smallest distances to the others
    scores = krum_scores(pairwise_sq_distances(LINE), num_adversaries=1)
    torch.testing.assert_close(scores, torch.tensor([1 + 4, 1 + 1, 1 + 4, 4 + 9, 36 + 64], dtype=torch.float64))


def test_krum_hand_computed():
    result = Krum(num_adversaries=1)(LINE, LINE_COUNTS, gen())
    # lowest score: x = 1 (score 2); Krum returns that update with weight 1
    assert torch.equal(result.update, LINE[1])
    assert torch.equal(result.client_weights, torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]))


def test_multi_krum_hand_computed_with_each_clients_own_count():
    result = MultiKrum(num_adversaries=1)(LINE, LINE_COUNTS, gen())
    # keeps n - f = 4 (drops x = 10, score 100); weights are the selected clients' own counts (1, 2, 3, 4) / 10,
    # not shifted by one as in the reference's rounds without an attacker (`docs/reference-deviations.md`, Q11)
    torch.testing.assert_close(result.client_weights, torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0]))
    torch.testing.assert_close(result.update, torch.tensor([0.1 * 0 + 0.2 * 1 + 0.3 * 2 + 0.4 * 4, 1.0, -1.0]))


def test_multi_krum_num_selected_and_ties_to_the_lowest_index():
    result = MultiKrum(num_adversaries=1, num_selected=2)(LINE, LINE_COUNTS, gen())
    # scores 5, 2, 5, 13, 100: x = 1 first, then the tie between x = 0 and x = 2 goes to index 0
    torch.testing.assert_close(result.client_weights, torch.tensor([1 / 3, 2 / 3, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(result.update, torch.tensor([2 / 3, 1.0, -1.0]))


@pytest.mark.parametrize("num_adversaries", [1, 2])
def test_krum_and_multi_krum_never_select_a_far_outlier(num_adversaries):
    for seed in range(20):
        g = gen(seed)
        n, dim = 10, 30
        deltas = torch.randn(n, dim, generator=g)
        slots = torch.randperm(n, generator=g)[:num_adversaries]
        far = torch.randn(dim, generator=g)
        deltas[slots] = 100 * far / far.norm() + 0.01 * torch.randn(num_adversaries, dim, generator=g)  # colluding
        counts = torch.randint(1, 100, (n,), generator=g).float()
        counts[slots] = 1000.0  # big claimed datasets do not buy a selection
        krum = Krum(num_adversaries)(deltas, counts, g)
        multi = MultiKrum(num_adversaries)(deltas, counts, g)
        assert krum.client_weights[slots].sum() == 0, seed
        assert multi.client_weights[slots].sum() == 0, seed
        assert (multi.client_weights > 0).sum() == n - num_adversaries


def test_krum_selection_matches_a_per_pair_numpy_transcription_of_the_reference():
    for seed in range(5):
        g = gen(seed)
        deltas = torch.randn(12, 500, generator=g) * torch.rand(12, 1, generator=g) * 3
        points = deltas.numpy().astype(np.float64)
        n, f = len(points), 2
        dists = np.zeros((n, n))
        for i in range(n):
            for j in range(i + 1, n):
                dists[i, j] = dists[j, i] = np.linalg.norm(points[i] - points[j]) ** 2
        scores = [np.sort(np.delete(dists[i], i))[: n - f - 2].sum() for i in range(n)]
        assert int(Krum(f)(deltas, torch.ones(n), g).client_weights.argmax()) == int(np.argmin(scores))
        kept = MultiKrum(f)(deltas, torch.ones(n), g).client_weights > 0
        assert set(kept.nonzero().flatten().tolist()) == set(np.argsort(scores)[: n - f].tolist())


def test_krum_needs_more_than_2f_plus_2_updates():
    with pytest.raises(ValueError, match=r"Krum with num_adversaries=1 needs more than .* = 4 updates.*got 4"):
        Krum(num_adversaries=1)(LINE[:4], LINE_COUNTS[:4], gen())
    with pytest.raises(ValueError, match=r"MultiKrum num_selected=6 must be in 1\.\.5"):
        MultiKrum(num_adversaries=1, num_selected=6)(LINE, LINE_COUNTS, gen())


@pytest.mark.parametrize(("make", "message"), [
    (lambda: Krum(-1), "Krum num_adversaries must be an integer >= 0"),
    (lambda: Krum(1.5), "Krum num_adversaries must be an integer >= 0"),
    (lambda: MultiKrum(1, 0), "MultiKrum num_selected must be an integer >= 1"),
    (lambda: GeometricMedian(max_iterations=-1), "GeometricMedian max_iterations must be an integer >= 0"),
    (lambda: GeometricMedian(smoothing=0.0), "GeometricMedian smoothing must be a finite number > 0"),
    (lambda: GeometricMedian(tolerance=float("nan")), "GeometricMedian tolerance must be a finite number >= 0"),
    (lambda: TrimmedMean(0.5), r"TrimmedMean beta must be in \[0, 0.5\)"),
    (lambda: TrimmedMean(-0.1), "TrimmedMean beta must be a finite number >= 0"),
    (lambda: NormClipping(0.0), "NormClipping norm_bound must be a finite number > 0"),
    (lambda: NormClipping(float("inf")), "NormClipping norm_bound must be a finite number > 0"),
    (lambda: NormClipping(1.0, inner="FedAvg"), "NormClipping inner must be an Aggregator or None"),
    (lambda: WeakDP(stddev=-1.0), "WeakDP stddev must be a finite number >= 0"),
])
def test_bad_parameters_get_a_clear_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# ----- RFA (geometric median) -----

def test_rfa_hand_computed_square_and_weighted_line():
    # four corners of a square, equal counts: the median is the centre, every client gets 1/4
    square = torch.tensor([[1.0, 1.0, 7.0], [-1.0, 1.0, 7.0], [-1.0, -1.0, 7.0], [1.0, -1.0, 7.0]])
    result = GeometricMedian()(square, torch.full((4,), 5.0), gen())
    torch.testing.assert_close(result.update, torch.tensor([0.0, 0.0, 7.0]))
    torch.testing.assert_close(result.client_weights, torch.full((4,), 0.25))
    # on a line the geometric median is the weighted median: counts 1..5 put it at x = 4 (6 of 15 below)
    result = GeometricMedian()(LINE, LINE_COUNTS, gen())
    torch.testing.assert_close(result.update, LINE[3], atol=1e-4, rtol=0)
    assert result.client_weights.argmax() == 3 and result.client_weights[3] > 0.9999


def test_rfa_hand_computed_fermat_point():
    # (0,0), (1,0), (0,1): the Fermat point (t, t) with 6t^2 - 6t + 1 = 0, t = (3 - sqrt 3) / 6, where the
    # unit vectors to the corners sum to 0; Weiszfeld weights 1/d normalised: [1/sqrt 3, t, t]
    t = (3 - math.sqrt(3)) / 6
    corners = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    result = GeometricMedian(max_iterations=1000, tolerance=0.0)(corners, torch.ones(3), gen())
    torch.testing.assert_close(result.update, torch.tensor([t, t], dtype=torch.float64))
    torch.testing.assert_close(result.client_weights, torch.tensor([1 / math.sqrt(3), t, t], dtype=torch.float64))


def brute_force_geometric_median(points: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """argmin_z sum_k w_k |z - p_k| over 2-D points by coarse-to-fine grid search (the objective is convex)."""
    center = (points.min(0).values + points.max(0).values) / 2
    half = float((points.max(0).values - points.min(0).values).max()) / 2 + 1e-9
    for _ in range(14):
        offsets = torch.linspace(-half, half, 41, dtype=torch.float64)
        gx, gy = torch.meshgrid(center[0] + offsets, center[1] + offsets, indexing="ij")
        grid = torch.stack([gx.flatten(), gy.flatten()], dim=1)  # [41 * 41, 2], small enough to stay single-threaded
        center = grid[((grid[:, None, :] - points[None]).norm(dim=2) * weights).sum(1).argmin()]
        half *= 4 / 40  # keep two cells either side of the best point
    return center


def objective(z: torch.Tensor, points: torch.Tensor, weights: torch.Tensor) -> float:
    return float((torch.cdist(z[None], points) * weights).sum())


def test_rfa_agrees_with_a_brute_force_geometric_median():
    for seed in range(8):
        g = gen(seed)
        n = 3 + seed % 5
        points = torch.randn(n, 2, generator=g, dtype=torch.float64)
        counts = torch.randint(1, 10, (n,), generator=g).double()
        best = brute_force_geometric_median(points, counts)
        # the paper's settings stop on a relative objective change of 1e-7: optimal to ~1e-5 in objective
        paper = GeometricMedian()(points, counts, g).update
        assert objective(paper, points, counts) <= objective(best, points, counts) * (1 + 1e-5), seed
        # run to convergence, it finds the minimiser itself (up to the 1e-5 smoothing)
        converged = GeometricMedian(max_iterations=1000, tolerance=0.0)(points, counts, g).update
        torch.testing.assert_close(converged, best, atol=5e-5, rtol=0)


def reference_rfa(points: np.ndarray, counts: np.ndarray, maxiter: int = 500, eps: float = 1e-5,
                  ftol: float = 1e-7) -> tuple[np.ndarray, np.ndarray]:
    """The reference's smoothed Weiszfeld, transcribed to numpy: direct float64 distances."""
    alphas = counts / counts.sum()
    median = (alphas[:, None] * points).sum(0)
    obj = sum(a * np.linalg.norm(median - p) for a, p in zip(alphas, points))
    weights = alphas
    for _ in range(maxiter):
        prev = obj
        weights = np.array([a / max(eps, np.linalg.norm(median - p)) for a, p in zip(alphas, points)])
        weights = weights / weights.sum()
        median = (weights[:, None] * points).sum(0)
        obj = sum(a * np.linalg.norm(median - p) for a, p in zip(alphas, points))
        if abs(prev - obj) < ftol * obj:
            break
    return median, weights


@pytest.mark.parametrize("colluders", [1, 6])
def test_rfa_matches_the_reference_algorithm(colluders):
    # 10 float32 updates with a shared direction; the attackers send one identical, scaled update. With 6
    # of 10 they hold the majority and the median sits on their point, where distances reach the smoothing.
    g = gen(colluders)
    deltas = torch.randn(10, 3000, generator=g) * 0.01 + 0.02 * torch.randn(3000, generator=g)
    deltas[:colluders] = deltas[0] * 20
    counts = torch.randint(50, 500, (10,), generator=g).float()
    result = GeometricMedian()(deltas, counts, gen())
    median, weights = reference_rfa(deltas.double().numpy(), counts.double().numpy())
    torch.testing.assert_close(result.update, torch.from_numpy(median).float(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(result.client_weights, torch.from_numpy(weights).float(), rtol=1e-4, atol=1e-6)


def test_rfa_without_iterations_is_the_weighted_mean():
    deltas, counts = torch.randn(5, 40, generator=gen(4)), torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0])
    result = GeometricMedian(max_iterations=0)(deltas, counts, gen())
    torch.testing.assert_close(result.update, counts @ deltas / counts.sum())
    torch.testing.assert_close(result.client_weights, counts / counts.sum())


# ----- near-identical updates (colluding near-copies, late rounds) -----
# Distances of float32 rows taken from their uncentred Gram matrix carry errors of ~1e-7 |update|^2, which
# swamp the distances themselves once updates differ by less than ~0.1 % of their size. The references below
# work on the same float32 rows in float64, directly from the differences.

NEAR_SPREADS = [1e-3, 1e-4, 1e-5, 1e-6]
NEAR_PARAMS = 20_000
SCORE_MARGIN = 1e-6
"""Smallest relative gap between the float64 scores at the selection boundary for a draw to count: the
centred float32 Gram errs by ~1e-7 of the spread's square, so closer scores are genuine near-ties."""


def near_identical(n: int, spread: float, seed: int) -> torch.Tensor:
    """`base + spread * noise`: n float32 updates of size ~|base| (~141), each off the base by `spread` times
    its own factor in [0.5, 1.5], so that their Krum scores differ."""
    g = gen(seed)
    base = torch.randn(NEAR_PARAMS, generator=g)
    scales = 0.5 + torch.rand(n, 1, generator=g)
    return base + spread * scales * torch.randn(n, NEAR_PARAMS, generator=g)


def brute_force_sq_distances(deltas: torch.Tensor) -> torch.Tensor:
    """`|a - b|^2` for every pair, from the float64 differences of the rows themselves (not a Gram matrix)."""
    rows = deltas.double()
    return torch.cdist(rows, rows, compute_mode="donot_use_mm_for_euclid_dist") ** 2


def clear_draw(n: int, spread: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The first draw (seed 0, 1, ...) whose float64 Krum scores at both selection boundaries (Krum's first
    and second, Multi-Krum's (n - 1)-th and n-th) differ by at least `SCORE_MARGIN` relative, with its scores."""
    for seed in range(20):
        deltas = near_identical(n, spread, seed)
        scores = krum_scores(brute_force_sq_distances(deltas), num_adversaries=1)
        ranked = scores.sort().values.tolist()
        if all(ranked[k] - ranked[k - 1] >= SCORE_MARGIN * ranked[k] for k in (1, n - 1)):
            return deltas, scores
    raise AssertionError(f"no draw without a near-tie at n={n}, spread={spread}")


@pytest.mark.parametrize("n", [5, 30, 100])
def test_krum_and_multi_krum_select_as_a_float64_brute_force_on_near_identical_updates(n):
    wrong = []
    for spread in NEAR_SPREADS:
        deltas, scores = clear_draw(n, spread)
        for rule, selected in ((Krum(1), 1), (MultiKrum(1), n - 1)):
            expected = set(scores.sort().indices[:selected].tolist())
            chosen = set(rule(deltas, torch.ones(n), gen()).client_weights.nonzero().flatten().tolist())
            if chosen != expected:
                wrong.append(f"{type(rule).__name__} spread {spread}: true score "
                             f"{float(scores[list(chosen - expected)].max() / scores.min()):.2f}x the minimum")
    assert not wrong, "\n".join(wrong)


def float64_weiszfeld(deltas: torch.Tensor, alpha: torch.Tensor, iterations: int, smoothing: float) -> torch.Tensor:
    """Client weights of the smoothed Weiszfeld iterate after `iterations` steps, with direct float64 distances."""
    rows, alpha = deltas.double(), alpha.double() / alpha.sum()
    beta = alpha
    for _ in range(iterations):
        z = beta @ rows  # [n_params]
        dists = torch.linalg.vector_norm(rows - z, dim=1)  # |w_k - z|, [n]
        beta = alpha / dists.clamp_min(smoothing)
        beta = beta / beta.sum()
    return beta


@pytest.mark.parametrize("n", [5, 30, 100])
def test_rfa_matches_a_float64_weiszfeld_on_near_identical_updates(n):
    # z = sum_k beta_k w_k, so |z - z_ref| <= |beta - beta_ref|_1 * max_k |w_k - z_ref|: an L1 gap of the
    # weights under 1e-3 puts the point within 0.1 % of the cluster's width of the reference's.
    wrong = []
    for spread in NEAR_SPREADS:
        deltas = near_identical(n, spread, seed=0)
        counts = torch.randint(1, 100, (n,), generator=gen(n)).float()
        result = GeometricMedian(max_iterations=25, tolerance=0.0)(deltas, counts, gen())
        reference = float64_weiszfeld(deltas, counts, iterations=25, smoothing=1e-5)
        gap = float((result.client_weights.double() - reference).abs().sum())
        if not gap < 1e-3:
            wrong.append(f"spread {spread}: |beta - beta_ref|_1 = {gap:.2g}")
    assert not wrong, "\n".join(wrong)


# ----- coordinate-wise rules -----

def test_coordinate_median_hand_computed():
    odd = torch.tensor([[1.0, 5.0, -1.0], [2.0, 0.0, 7.0], [10.0, 3.0, 3.0]])
    result = CoordinateMedian()(odd, torch.tensor([1.0, 1.0, 100.0]), gen())
    assert torch.equal(result.update, torch.tensor([2.0, 3.0, 3.0])) and result.client_weights is None
    even = torch.cat([odd, torch.tensor([[4.0, -2.0, 0.0]])])
    # middle two values per coordinate: (2, 4) -> 3, (0, 3) -> 1.5, (0, 3) -> 1.5
    assert torch.equal(CoordinateMedian()(even, torch.ones(4), gen()).update, torch.tensor([3.0, 1.5, 1.5]))


def test_trimmed_mean_hand_computed():
    deltas = torch.tensor([[1.0, 50.0], [2.0, -3.0], [3.0, 0.0], [4.0, 1.0], [100.0, 2.0]])
    # beta 0.2 of 5 trims one value at each end: mean(2, 3, 4) = 3; mean(0, 1, 2) = 1
    result = TrimmedMean(beta=0.2)(deltas, torch.arange(1.0, 6.0), gen())
    torch.testing.assert_close(result.update, torch.tensor([3.0, 1.0]))
    assert result.client_weights is None
    # beta 0.3 of 10 trims 3 (not 3.0000000000000004 -> 3 by luck); beta 0: the unweighted mean
    ten = torch.arange(10.0)[:, None]
    assert TrimmedMean(beta=0.3)(ten, torch.ones(10), gen()).update.item() == 4.5
    torch.testing.assert_close(TrimmedMean(beta=0.0)(deltas, torch.ones(5), gen()).update, deltas.mean(0))
    assert TrimmedMean(beta=0.29)(ten, torch.ones(10), gen()).update.item() == 4.5  # floor(2.9) = 2: mean(2..7)


# ----- properties shared by the rules -----

@pytest.mark.parametrize("make", [FedAvg, CoordinateMedian, GeometricMedian, lambda: TrimmedMean(0.2),
                                  lambda: MultiKrum(1), lambda: NormClipping(1.0)], ids=lambda m: getattr(
                                      m, "__name__", "factory"))
def test_rules_do_not_depend_on_client_order(make):
    g = gen(5)
    deltas = torch.randn(9, 200, generator=g) * torch.rand(9, 1, generator=g) * 3
    counts = torch.randint(1, 100, (9,), generator=g).float()
    perm = torch.randperm(9, generator=g)
    a = make()(deltas, counts, gen())
    b = make()(deltas[perm], counts[perm], gen())
    torch.testing.assert_close(a.update, b.update)
    if a.client_weights is not None:
        torch.testing.assert_close(a.client_weights[perm], b.client_weights)


@pytest.mark.parametrize("make", [lambda: Krum(1), lambda: MultiKrum(1), GeometricMedian, CoordinateMedian,
                                  lambda: TrimmedMean(0.2), lambda: NormClipping(1.0), lambda: WeakDP(1.0, 0.1)])
def test_rules_leave_their_inputs_alone_and_weights_sum_to_one(make):
    deltas, counts = torch.randn(7, 300, generator=gen(6)) * 2, torch.arange(1.0, 8.0)
    before = (deltas.clone(), counts.clone())
    result = make()(deltas, counts, gen())
    assert torch.equal(deltas, before[0]) and torch.equal(counts, before[1])
    assert result.update.shape == (300,) and result.update.dtype == deltas.dtype
    if result.client_weights is not None:
        torch.testing.assert_close(result.client_weights.sum(), torch.tensor(1.0))


def test_gram_matrix_is_accurate_over_many_columns_and_in_the_float64_fallback(monkeypatch):
    g = gen(8)
    deltas = torch.randn(6, 5 * kernels.GRAM_BLOCK + 17, generator=g) + 0.5  # blocks plus a tail
    exact = deltas.double() @ deltas.double().T
    torch.testing.assert_close(gram_matrix(deltas), exact, rtol=1e-6, atol=0)  # float32 within a block
    monkeypatch.setattr(kernels, "fp32_matmul_is_exact", lambda device: False)  # as under TF32 / bf16 matmuls
    monkeypatch.setattr(kernels, "GRAM_MAX_PARTIAL", 6 * kernels.GRAM_BLOCK * 2)  # two blocks per product
    torch.testing.assert_close(gram_matrix(deltas), exact, rtol=1e-12, atol=0)


@pytest.mark.parametrize("n", [1, 5, 16, 17, 30, 47])
def test_gram_matrix_panels_cover_every_pair_once(n, monkeypatch):
    # panels of 16 columns, the last one shifted back to end at row n: no entry missed or counted twice
    monkeypatch.setattr(kernels, "GRAM_BLOCK", 256)
    monkeypatch.setattr(kernels, "GRAM_CPU_GROUP_BYTES", n * 256 * 4 * 2)  # two blocks per group
    deltas = torch.randn(n, 5 * 256 + 3, generator=gen(n)) + 0.25
    gram = gram_matrix(deltas)
    assert torch.equal(gram, gram.T)
    torch.testing.assert_close(gram, deltas.double() @ deltas.double().T, rtol=1e-5, atol=1e-4)  # a block: ~16


def test_chunked_paths_agree_with_unchunked_ones(monkeypatch):
    g = gen(9)
    deltas, counts = torch.randn(7, 1000, generator=g), torch.randint(1, 50, (7,), generator=g).float()
    rules = [lambda: MultiKrum(1), GeometricMedian, CoordinateMedian, lambda: TrimmedMean(0.2)]
    whole = [make()(deltas, counts, gen()) for make in rules]
    monkeypatch.setattr(kernels, "SORT_COLUMN_CHUNK", 45)
    monkeypatch.setattr(kernels, "GRAM_BLOCK", 64)
    monkeypatch.setattr(kernels, "GRAM_MAX_PARTIAL", 7 * 7 * 3)  # three blocks per product on GPUs
    monkeypatch.setattr(kernels, "GRAM_CPU_GROUP_BYTES", 7 * 64 * 4 * 3)  # and on CPUs
    for make, reference in zip(rules, whole):
        result = make()(deltas, counts, gen())
        torch.testing.assert_close(result.update, reference.update, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("spread", [None, 1e-5], ids=["ordinary", "near_identical"])  # plain and centred Gram
def test_results_do_not_depend_on_the_thread_count(spread):
    g = gen(10)
    deltas = torch.randn(12, 300_000, generator=g) * torch.rand(12, 1, generator=g)
    if spread is not None:
        deltas = torch.randn(300_000, generator=g) + spread * deltas
    counts = torch.randint(1, 100, (12,), generator=g).float()
    rules = [lambda: Krum(1), lambda: MultiKrum(1), GeometricMedian, CoordinateMedian, lambda: TrimmedMean(0.1),
             lambda: NormClipping(0.5), lambda: WeakDP(0.5, 0.1)]
    results = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)  # restored by the conftest fixture
        results[threads] = [make()(deltas, counts, gen()) for make in rules]
    for one, two in zip(results[1], results[2]):
        assert torch.equal(one.update, two.update)


# ----- through the CLI -----

def test_weak_dp_around_krum_through_the_cli(tmp_path):
    # one run covers both (a CLI start costs seconds): WeakDP's clipping and noise around an inner Krum that
    # must give the model-replacement attacker of every round no weight
    run_cli("fit", "--task", "toy", "--aggregator", "WeakDP", "--aggregator.stddev", "0.01",
            "--aggregator.inner", "Krum", "--aggregator.inner.num_adversaries", "1", "--fl.rounds", "2",
            "--callbacks+=EdgeCaseAttack", "--callbacks.attack_every", "1", "--callbacks.model_replacement", "true",
            "--log.logger", "csv", "--log.progress_bar", "false", "--name", "dp_krum", "--accelerator", "cpu",
            cwd=tmp_path)
    run_dir = tmp_path / "runs" / "dp_krum"
    config = yaml.safe_load((run_dir / "config.yaml").read_text())["aggregator"]
    # exported classes are saved under their public name, which survives moves between modules
    assert config["class_path"] == "fl_lightning.callbacks.WeakDP"
    assert config["init_args"]["stddev"] == 0.01 and config["init_args"]["norm_bound"] == 2.0
    assert config["init_args"]["inner"] == {"class_path": "fl_lightning.callbacks.Krum",
                                            "init_args": {"num_adversaries": 1}}
    rows = read_metrics(run_dir)[1:]
    assert [float(r["num_adversaries"]) for r in rows] == [1.0, 1.0]
    assert [float(r["adversary_weight"]) for r in rows] == [0.0, 0.0]


def test_configs_saved_before_the_rules_moved_still_load(capsys, tmp_path):
    # config.yaml files written before robust.py was split name fl_lightning.callbacks.robust.Krum
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"task": "toy", "aggregator": {
        "class_path": "fl_lightning.callbacks.clipping.WeakDP",
        "init_args": {"norm_bound": 2.0, "stddev": 0.01, "inner": {
            "class_path": "fl_lightning.callbacks.robust.Krum", "init_args": {"num_adversaries": 1}}}}}))
    code, out, _ = run_main(capsys, "fit", "--config", str(path), "--print_config")
    assert code == 0
    inner = yaml.safe_load(out)["aggregator"]["init_args"]["inner"]
    assert inner["class_path"].endswith("Krum") and inner["init_args"] == {"num_adversaries": 1}


def test_weak_dp_noise_on_the_model_does_not_shrink_with_the_server_step(tmp_path):
    # A norm bound of 1e-12 leaves the clients' step at ~0, so the model moves by the noise alone:
    # the same draw at server_lr 1 and 0.25 (it used to be scaled by server_lr).
    def moved(name: str, stddev: str, server_lr: str) -> torch.Tensor:
        run_cli("fit", "--task", "toy", "--fl.rounds", "1", "--aggregator", "WeakDP",
                "--aggregator.norm_bound", "1e-12", "--aggregator.stddev", stddev, "--fl.server_lr", server_lr,
                "--log.logger", "csv", "--log.progress_bar", "false", "--fl.eval_every", "0", "--name", name,
                "--accelerator", "cpu", cwd=tmp_path)
        return final_model(tmp_path / "runs" / name)

    start = moved("still", "0.0", "1.0")
    full, quarter = moved("full", "0.5", "1.0") - start, moved("quarter", "0.5", "0.25") - start
    torch.testing.assert_close(quarter, full, atol=1e-6, rtol=0)
    assert 0.4 < full.std().item() < 0.6


# ----- Bulyan (El Mhamdi et al., ICML 2018) -----

def test_bulyan_by_hand():
    from fl_lightning.callbacks.bulyan import Bulyan, bulyan_selection
    from fl_lightning.kernels import pairwise_sq_distances

    # Seven scalar updates, f = 1 (n = 4f + 3): theta = 5 Krum picks, then the beta = 3 values nearest the median.
    deltas = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0], [5.0], [100.0]])
    # Picks (worked by hand from Krum's scores over what is left): 2 (scores 30, 15, 10, 10, 15, 30, ...), 3, then
    # 1 (a tie with 4: the lower index), 4 and 0 (one nearest neighbour each once fewer than f + 3 are left).
    assert bulyan_selection(pairwise_sq_distances(deltas), 1).tolist() == [2, 3, 1, 4, 0]
    result = Bulyan(num_adversaries=1).aggregate(deltas, torch.ones(7), torch.Generator())
    assert result.update.tolist() == [2.0]  # the mean of 1, 2, 3 around the median 2 of {0, 1, 2, 3, 4}
    assert result.flagged.tolist() == [False] * 5 + [True, True] and result.client_weights is None


def test_bulyan_trimmed_mean_around_the_median_by_hand():
    from fl_lightning.callbacks.bulyan import trimmed_mean_around_median

    rows = torch.tensor([[1.0, 10.0, 0.0], [2.0, 0.0, 1.0], [7.0, 4.0, 3.0], [3.0, 5.0, 4.0]])
    # Medians 2.5, 4.5 and 2; the two nearest values per column: {2, 3}, {4, 5}, and {1, 3} (1 and 3 tie at
    # distance 1 with each other; 0 and 4 are farther).
    assert trimmed_mean_around_median(rows, keep=2).tolist() == [2.5, 4.5, 2.0]
    # One value: of 1 and 3, equally far from the median 2, the lower one.
    assert trimmed_mean_around_median(rows[:, 2:], keep=1).tolist() == [1.0]


@pytest.mark.parametrize("seed", range(3))
def test_bulyan_flags_a_planted_far_outlier(seed):
    from fl_lightning.callbacks.bulyan import Bulyan

    generator = torch.Generator().manual_seed(seed)
    deltas = torch.randn(11, 50, generator=generator)  # f = 2: n = 4f + 3
    outlier = int(torch.randint(11, (1,), generator=generator))
    deltas[outlier] += 100.0
    result = Bulyan(num_adversaries=2).aggregate(deltas, torch.ones(11), generator)
    assert bool(result.flagged[outlier]) and int(result.flagged.sum()) == 4
    honest = torch.cat([deltas[:outlier], deltas[outlier + 1:]])
    # Every coordinate stays within the honest values' range.
    assert bool((result.update <= honest.max(dim=0).values).all() and (result.update >= honest.min(dim=0).values).all())


def test_bulyan_refuses_too_few_updates():
    from fl_lightning.callbacks.bulyan import Bulyan
    from fl_lightning.config import ConfigError, FLArgs

    with pytest.raises(ConfigError, match=r"Bulyan needs at least 4 \* f \+ 3 = 7 updates per round"):
        Bulyan(num_adversaries=1).check_run(FLArgs(num_clients=20, clients_per_round=6))
    with pytest.raises(ValueError, match="at least 4 \\* f \\+ 3 = 11"):
        Bulyan(num_adversaries=2).aggregate(torch.zeros(10, 3), torch.ones(10), torch.Generator())


def test_bulyan_through_the_cli_reports_detection(tmp_path):
    run_cli("fit", "--task", "toy", "--fl.rounds", "2", "--fl.clients_per_round", "7", "--aggregator", "Bulyan",
            "--callbacks+=EdgeCaseAttack", "--callbacks.attack_every", "1", "--log.logger", "csv",
            "--log.progress_bar", "false", "--name", "bulyan", cwd=tmp_path)
    rows = read_metrics(tmp_path / "runs" / "bulyan")
    for row in rows[1:]:
        # Bulyan leaves 2f = 2 of the 7 updates out every round: the attacker and one honest, or two honest.
        flagged = float(row["detection_tpr"]) + 6 * float(row["detection_fpr"])
        assert flagged == pytest.approx(2.0)


# ----- FLAME (Nguyen et al., USENIX Security 2022) -----

def test_flame_by_hand():
    from fl_lightning.callbacks.flame import FLAME

    # Three updates pointing one way, one the other way: HDBSCAN (min cluster size 3) keeps the three.
    deltas = torch.tensor([[1.0, 0.0], [1.0, 0.1], [2.0, 0.1], [-1.0, 0.0]])
    result = FLAME(noise_lambda=0.0).aggregate(deltas, torch.ones(4), torch.Generator().manual_seed(0))
    assert result.flagged.tolist() == [False, False, False, True]
    norms = deltas.double().norm(dim=1)  # 1, 1.005, 2.0025, 1
    bound = (1.0 + float(norms[1])) / 2  # the median of four: the mean of the two middle norms
    clipped = [deltas[i].double() * min(1.0, bound / float(norms[i])) for i in range(3)]
    torch.testing.assert_close(result.update.double(), sum(clipped) / 3, rtol=1e-6, atol=1e-7)
    assert float(result.noise.abs().sum()) == 0.0 and result.client_weights.tolist() == pytest.approx([1 / 3] * 3 + [0])


def test_flame_noise_is_lambda_times_the_median_norm():
    from fl_lightning.callbacks.flame import FLAME

    deltas = torch.ones(5, 40_000) * torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])[:, None]  # norms 200 .. 1000
    result = FLAME(noise_lambda=0.01).aggregate(deltas, torch.ones(5), torch.Generator().manual_seed(1))
    assert float(result.noise.std()) == pytest.approx(0.01 * 600.0, rel=0.02)  # S_t = the median norm, 600
    assert result.flagged.tolist() == [False] * 5  # one direction: one cluster


@pytest.mark.parametrize("seed", range(3))
def test_flame_leaves_out_a_planted_backdoor_direction(seed):
    from fl_lightning.callbacks.flame import FLAME

    generator = torch.Generator().manual_seed(seed)
    common = torch.randn(200, generator=generator)
    deltas = common + 0.3 * torch.randn(10, 200, generator=generator)  # honest: one shared direction plus noise
    attackers = [1, 6]
    deltas[attackers] = torch.randn(200, generator=generator) * 3  # a sybil pair along another direction
    result = FLAME().aggregate(deltas, torch.ones(10), generator)
    # The pair is left out; the admitted cluster is a majority (HDBSCAN may leave out an honest straggler too).
    assert result.flagged[attackers].all() and int((~result.flagged).sum()) >= 10 // 2 + 1


# ----- RobustLR (Ozdayi et al., AAAI 2021) -----

def test_robust_lr_by_hand():
    from fl_lightning.callbacks.robust_lr import RobustLR

    # Four updates, three coordinates. Signs per coordinate: (+ + + +) sum 4, (+ - + -) sum 0, (+ + + -) sum 2.
    deltas = torch.tensor([[1.0, 1.0, 1.0], [2.0, -1.0, 1.0], [1.0, 2.0, 2.0], [4.0, -4.0, -8.0]])
    weights = torch.tensor([1.0, 1.0, 1.0, 1.0])
    result = RobustLR(threshold=3).aggregate(deltas, weights, torch.Generator())
    mean = deltas.mean(dim=0)  # 2, -0.5, -1
    # Only the first coordinate has agreement >= 3; the others move backwards.
    torch.testing.assert_close(result.update, torch.tensor([mean[0], -mean[1], -mean[2]]))
    weighted = RobustLR(threshold=2).aggregate(deltas, torch.tensor([3.0, 1.0, 0.0, 0.0]), torch.Generator())
    # Weighted mean (3 * row0 + row1) / 4 = 1.25, 0.5, 1; coordinate 2 (sum 0) flips, 3 (sum 2) does not.
    torch.testing.assert_close(weighted.update, torch.tensor([1.25, -0.5, 1.0]))
    assert weighted.client_weights.tolist() == [0.75, 0.25, 0.0, 0.0]


def test_robust_lr_pushes_back_a_lone_attacker_coordinate():
    from fl_lightning.callbacks.robust_lr import RobustLR
    from fl_lightning.config import ConfigError, FLArgs

    honest = torch.zeros(9, 4)
    honest[:, 0] = 1.0  # every honest update moves coordinate 0 only
    attacker = torch.tensor([[0.0, 0.0, 0.0, 5.0]])  # the backdoor coordinate 3, pushed by one update
    result = RobustLR(threshold=4).aggregate(torch.cat([honest, attacker]), torch.ones(10), torch.Generator())
    assert float(result.update[0]) > 0 and float(result.update[3]) < 0  # the backdoor step is reversed
    with pytest.raises(ConfigError, match="--aggregator.threshold=11"):
        RobustLR(threshold=11).check_run(FLArgs(num_clients=20, clients_per_round=10))


# ----- FoolsGold (Fung et al., RAID 2020) -----

def foolsgold_by_loops(histories: list[list[float]], kappa: float = 1.0) -> list[float]:
    """Algorithm 1 of the paper, element by element, as an independent check of the vectorised code."""
    n = len(histories)
    norm = [math.sqrt(sum(x * x for x in h)) for h in histories]
    cs = [[sum(a * b for a, b in zip(histories[i], histories[j])) / (norm[i] * norm[j]) if i != j else 0.0
           for j in range(n)] for i in range(n)]
    v = [max(cs[i][j] for j in range(n) if j != i) for i in range(n)]
    for i in range(n):
        for j in range(n):
            if i != j and v[i] < v[j]:
                cs[i][j] *= v[i] / v[j]
    alpha = [min(max(1 - max(cs[i][j] for j in range(n) if j != i), 0.0), 1.0) for i in range(n)]
    top = max(alpha)
    alpha = [a / top for a in alpha]
    alpha = [0.99 if a == 1 else a for a in alpha]
    out = []
    for a in alpha:
        logit = kappa * (math.log(a / (1 - a)) + 0.5) if a > 0 else 0.0
        out.append(min(max(logit, 0.0), 1.0))
    return out


@pytest.mark.parametrize("histories", [
    [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]],                                   # a sybil pair and one honest client
    [[1.0, 0.2, 0.0], [0.9, 0.3, 0.1], [0.0, 1.0, 0.3], [0.2, 0.1, 1.0]],   # pardoning changes the weights
    [[3.0, 1.0], [1.0, 3.0], [2.0, 2.5], [-1.0, 2.0], [0.5, -1.0]],
])
def test_foolsgold_weights_by_hand(histories):
    from fl_lightning.callbacks.foolsgold import foolsgold_weights

    expected = foolsgold_by_loops(histories)
    assert foolsgold_weights(torch.tensor(histories, dtype=torch.float64)).tolist() == pytest.approx(expected)
    if len(histories) == 3:
        assert expected == [0.0, 0.0, 1.0]  # the identical pair gets nothing, the honest client everything


def test_foolsgold_sketch_is_linear_and_keeps_inner_products():
    from fl_lightning.callbacks.foolsgold import FoolsGold

    rule = FoolsGold(sketch_size=4096)
    a, b = torch.randn(2, 200_000, generator=torch.Generator().manual_seed(0))
    sketches = rule.sketch(torch.stack([a, b, a + b]))
    torch.testing.assert_close(sketches[2], sketches[0] + sketches[1], atol=1e-5, rtol=1e-5)  # a + b rounds in float32
    cosine = float(torch.nn.functional.cosine_similarity(sketches[0], sketches[0] + 0.5 * sketches[1], dim=0))
    assert cosine == pytest.approx(float(torch.nn.functional.cosine_similarity(a, a + 0.5 * b, dim=0)), abs=0.03)


def test_foolsgold_zeroes_a_sybil_pair_over_rounds_and_restores_its_state():
    from fl_lightning.aggregation import RoundContext
    from fl_lightning.callbacks.foolsgold import FoolsGold

    generator = torch.Generator().manual_seed(3)
    rule, direction = FoolsGold(), torch.randn(500, generator=generator)
    for round_idx, ids in enumerate(([0, 1, 7, 9], [3, 7, 9, 5], [7, 2, 9, 4]), start=1):
        deltas = torch.randn(4, 500, generator=generator)
        sybils = [ids.index(7), ids.index(9)]  # clients 7 and 9 push one direction every round
        deltas[sybils] = direction + 0.01 * torch.randn(2, 500, generator=generator)
        rule.begin_round(RoundContext(round_idx, torch.tensor(ids), torch.zeros(500)))
        result = rule.aggregate(deltas, torch.ones(4), generator)
        assert result.client_weights[sybils].tolist() == [0.0, 0.0] and result.flagged[sybils].all()
    assert rule.client_ids.tolist() == [0, 1, 2, 3, 4, 5, 7, 9]
    restored = FoolsGold()
    restored.load_state_dict(rule.state_dict())
    assert torch.equal(restored.histories, rule.histories) and torch.equal(restored.client_ids, rule.client_ids)


# FoolsGold's histories travel in the checkpoint, FLTrust's server trains from the round's seed, DeepSight's
# probes are drawn from it, FLAME's and CRFL's noise too (CRFL around FedAvg flags no update, so reports no
# detection). FLDetector's window resumes in tests/test_fldetector.py, with a window short enough to detect;
# Bulyan and RobustLR keep no state and draw nothing. The rules whose only state is the round's generator run
# with -m slow (the default suite keeps to its 10 minutes); the engine's own resume tests cover that generator.
@pytest.mark.parametrize(("rule", "options"), [
    ("FoolsGold", ()), ("FLTrust", ()), pytest.param("FLAME", (), marks=pytest.mark.slow),
    pytest.param("DeepSight", ("--aggregator.num_samples", "200"), marks=pytest.mark.slow),
    pytest.param("CRFL", (), marks=pytest.mark.slow)])
def test_later_rules_through_the_cli_resume_bitwise(tmp_path, rule, options):
    common = ["fit", "--task", "toy", "--fl.rounds", "4", "--fl.checkpoint_every", "1", "--aggregator", rule, *options,
              "--log.logger", "csv", "--log.progress_bar", "false", "--num_threads", "1"]
    run_cli(*common, "--name", "straight", cwd=tmp_path)
    killer = ("--callbacks+=fl_test_callbacks.KillMidRound", "--callbacks.round_idx=3", "--callbacks.slot=1",
              f"--callbacks.marker={tmp_path / 'killed'}")
    assert run_cli(*common, *killer, "--name", "killed", cwd=tmp_path, check=False).returncode != 0
    run_cli("fit", "--resume", str(tmp_path / "runs" / "killed"), cwd=tmp_path)
    assert torch.equal(final_model(tmp_path / "runs" / "killed"), final_model(tmp_path / "runs" / "straight"))
    assert rule == "CRFL" or "detection_fpr" in read_metrics(tmp_path / "runs" / "straight")[1]


# ----- LocalDP (Naseri et al., NDSS 2022) -----

def test_local_dp_clips_and_noises_honest_updates_only():
    from fl_lightning.callbacks.local_dp import LocalDP
    from fl_lightning.sampling import derive_seed
    from fl_lightning.types import ClientUpdate

    class Ctx:
        def __init__(self, adversary: bool) -> None:
            self.is_adversary, self.seed = adversary, 1234

    def update(delta):
        return ClientUpdate(slot=0, client_id=0, delta=delta, num_examples=1, loss=0.0, is_adversary=False)

    honest = update(torch.tensor([3.0, 4.0]))  # norm 5: clipped to 1.5, then noised
    LocalDP(norm_bound=1.5, stddev=0.1).on_client_end(Ctx(False), honest)
    noise = torch.randn(2, generator=torch.Generator().manual_seed(derive_seed(0x1D9, 1234)))
    torch.testing.assert_close(honest.delta, torch.tensor([0.9, 1.2]) + 0.1 * noise)
    attacker = update(torch.tensor([30.0, 40.0]))
    LocalDP().on_client_end(Ctx(True), attacker)
    assert attacker.delta.tolist() == [30.0, 40.0]
    small = update(torch.tensor([0.3, 0.4]))
    LocalDP(norm_bound=1.5, stddev=0.0).on_client_end(Ctx(False), small)
    assert small.delta.tolist() == pytest.approx([0.3, 0.4])  # inside the bound: untouched


def test_local_dp_through_the_cli_is_the_same_on_two_processes(tmp_path):
    common = ["fit", "--task", "toy", "--fl.rounds", "2", "--fl.clients_per_round", "6", "--callbacks+=LocalDP",
              "--callbacks.stddev", "0.01", "--log.logger", "csv", "--log.progress_bar", "false", "--num_threads", "1",
              "--accelerator", "cpu"]
    run_cli(*common, "--devices", "1", "--name", "one", cwd=tmp_path)
    run_cli(*common, "--devices", "2", "--name", "two", cwd=tmp_path)
    assert torch.equal(final_model(tmp_path / "runs" / "one"), final_model(tmp_path / "runs" / "two"))
    assert float(read_metrics(tmp_path / "runs" / "one")[1]["update_norm_benign"]) > 0


@pytest.mark.parametrize("theta, keep", [(5, 3), (8, 4), (9, 9), (6, 4), (11, 7)])  # theta - keep = 2f, even
def test_bulyan_window_equals_the_nearest_values_column_by_column(theta, keep):
    from fl_lightning.callbacks.bulyan import trimmed_mean_around_median

    rows = torch.randn(theta, 300, generator=torch.Generator().manual_seed(theta * 10 + keep))
    expected = []
    for column in rows.T.tolist():
        ordered = sorted(column)
        median = (ordered[(theta - 1) // 2] + ordered[theta // 2]) / 2
        nearest = sorted(ordered, key=lambda v: (abs(v - median), v))[:keep]  # ties: the lower value
        expected.append(sum(nearest) / keep)
    torch.testing.assert_close(trimmed_mean_around_median(rows, keep), torch.tensor(expected), rtol=1e-5, atol=1e-6)
