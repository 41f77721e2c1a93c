"""Partitions: every index exactly once, seeded, skewed as alpha says, natural per-user groups, edge holders."""

from __future__ import annotations

import numpy as np
import pytest
from partition_oracles import attach_to_clients, dirichlet_partition, iid_partition, natural_partition

from fl_lightning.task import ClientPartition
from fl_lightning.tasks.partition import default_min_size, spread_over_holders

LABELS = np.random.default_rng(0).integers(0, 10, size=5000)


def assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    merged = np.concatenate(parts)
    assert merged.dtype == np.int64
    assert merged.shape[0] == n
    assert np.array_equal(np.sort(merged), np.arange(n))


def label_skew(parts: list[np.ndarray], labels: np.ndarray) -> float:
    """Mean share of a client's most frequent class (1/10 for a perfectly balanced client)."""
    return float(np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]))


@pytest.mark.parametrize("alpha", [0.1, 0.5, 10.0])
def test_dirichlet_covers_every_index_once_with_min_size(alpha):
    parts = dirichlet_partition(LABELS, 50, alpha, seed=3, min_size=10)
    assert len(parts) == 50
    assert_exact_cover(parts, LABELS.shape[0])
    assert min(len(p) for p in parts) >= 10


def test_dirichlet_is_deterministic_in_seed():
    a = dirichlet_partition(LABELS, 40, 0.5, seed=1)
    b = dirichlet_partition(LABELS, 40, 0.5, seed=1)
    c = dirichlet_partition(LABELS, 40, 0.5, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_dirichlet_skew_follows_alpha():
    skews = [label_skew(dirichlet_partition(LABELS, 50, alpha, seed=0), LABELS) for alpha in (0.1, 0.5, 100.0)]
    assert skews[0] > skews[1] > skews[2]
    assert skews[2] < 0.25  # near-IID at large alpha
    assert skews[0] > 0.5   # most of a client's data from one class at alpha 0.1


def test_dirichlet_rejects_impossible_requests():
    with pytest.raises(ValueError, match="num_clients=600"):
        dirichlet_partition(LABELS, 600, 0.5, seed=0, min_size=10)
    with pytest.raises(RuntimeError, match="raise alpha or lower num_clients"):
        dirichlet_partition(LABELS, 400, 0.5, seed=0, min_size=12, max_draws=3)


def test_default_min_size_is_the_reference_ten_unless_infeasible():
    assert default_min_size(240_000, 3383) == 10   # EMNIST
    assert default_min_size(50_000, 200) == 10     # CIFAR-10
    assert default_min_size(60_000, 3383) == 3     # MNIST over the EMNIST preset
    assert default_min_size(100, 100) == 1


def test_mnist_sized_split_over_3383_clients_is_feasible():
    labels = np.random.default_rng(1).integers(0, 10, size=60_000)
    parts = dirichlet_partition(labels, 3383, 0.5, seed=0, min_size=default_min_size(60_000, 3383))
    assert_exact_cover(parts, 60_000)
    assert min(len(p) for p in parts) >= 3


def test_iid_covers_once_with_near_equal_sizes():
    parts = iid_partition(1003, 10, seed=4)
    assert_exact_cover(parts, 1003)
    assert {len(p) for p in parts} == {100, 101}
    assert all(np.array_equal(x, y) for x, y in zip(parts, iid_partition(1003, 10, seed=4), strict=True))
    with pytest.raises(ValueError, match="exceeds"):
        iid_partition(5, 6, seed=0)


def test_natural_partition_groups_by_user_in_file_order():
    users = np.array(["bob", "amy", "bob", "cat", "amy", "bob", "dan"])
    parts = natural_partition(users)
    assert [p.tolist() for p in parts] == [[1, 4], [0, 2, 5], [3], [6]]  # users sorted: amy, bob, cat, dan
    assert [p.tolist() for p in natural_partition(users, min_size=2)] == [[1, 4], [0, 2, 5]]


def test_natural_partition_draws_users_by_seed():
    users = np.repeat(np.arange(100), 3)
    a = natural_partition(users, num_clients=10, seed=1)
    b = natural_partition(users, num_clients=10, seed=1)
    c = natural_partition(users, num_clients=10, seed=2)
    assert len(a) == 10 and all(len(p) == 3 for p in a)
    assert [p.tolist() for p in a] == [p.tolist() for p in b]
    assert [p.tolist() for p in a] != [p.tolist() for p in c]
    merged = np.concatenate(a)
    assert np.unique(merged).shape[0] == merged.shape[0]  # no index twice
    with pytest.raises(ValueError, match="exceeds the 100 users"):
        natural_partition(users, num_clients=101)


def test_spread_over_holders_keeps_groups_and_draws_holders_by_seed():
    extra = spread_over_holders(40, 200, 5, seed=0, group_size=4)
    assert len(extra) == 5
    holders = [c for c, _ in extra]
    assert len(set(holders)) == 5 and all(0 <= c < 200 for c in holders)
    items = np.concatenate([i for _, i in extra])
    assert np.array_equal(np.sort(items), np.arange(40))
    assert all(len(i) % 4 == 0 and np.all(i.reshape(-1, 4) % 4 == np.arange(4)) for _, i in extra)
    assert holders != list(range(5))
    assert holders == [c for c, _ in spread_over_holders(40, 200, 5, seed=0, group_size=4)]
    assert holders != [c for c, _ in spread_over_holders(40, 200, 5, seed=1, group_size=4)]
    assert len(spread_over_holders(6, 3, 10, seed=0)) == 3  # capped at K


def test_attach_to_clients_appends_rows_and_builds_csr():
    parts = iid_partition(20, 4, seed=0)
    extra = [(2, np.array([0, 1])), (0, np.array([2]))]
    joined = attach_to_clients(parts, extra, offset=20)
    assert_exact_cover(joined, 23)
    assert joined[2][-2:].tolist() == [20, 21] and joined[0][-1] == 22
    csr = ClientPartition.from_lists(joined)
    assert csr.sizes().tolist() == [len(p) for p in joined]
    assert csr.indices(2).tolist() == joined[2].tolist()
