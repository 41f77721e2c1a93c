"""Scale in K: `--data.tile` (index replication), the vectorised Dirichlet split, the CSR helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from cli_helpers import run_main
from partition_oracles import attach_to_clients, dirichlet_partition, iid_partition

from fl_lightning.config import ConfigError
from fl_lightning.task import ClientPartition
from fl_lightning.tasks import get_task_class
from fl_lightning.tasks.partition import attach_rows, default_min_size, dirichlet_split, iid_split, label_partition

LABELS = np.random.default_rng(5).integers(0, 10, size=3000)


def reference_dirichlet_partition(labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_size: int = 10,
                                  max_draws: int = 10_000) -> list[np.ndarray]:
    """The per-client loop `dirichlet_partition` was before it was vectorised (kept verbatim to compare with)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, 1709])
    cap = labels.shape[0] / num_clients
    classes = np.unique(labels)
    for _ in range(max_draws):
        pieces: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for cls in classes:
            members = rng.permutation(np.flatnonzero(labels == cls))
            share = rng.dirichlet(np.full(num_clients, alpha)) * (sizes < cap)
            share /= share.sum()
            cuts = (np.cumsum(share) * members.shape[0]).astype(np.int64)[:-1]
            for client_id, piece in enumerate(np.split(members, cuts)):
                pieces[client_id].append(piece)
                sizes[client_id] += piece.shape[0]
        if sizes.min() >= min_size:
            return [rng.permutation(np.concatenate(p)).astype(np.int64) for p in pieces]
    raise RuntimeError("no split")


def same_parts(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(("num_clients", "alpha", "seed", "min_size"),
                         [(10, 0.5, 0, 10), (50, 0.5, 3, 10), (200, 0.5, 1, 3), (100, 0.1, 2, 2), (80, 10.0, 4, 10),
                          (500, 0.5, 7, 1), (150, 0.2, 9, 2)])
def test_vectorised_dirichlet_equals_the_per_client_loop(num_clients, alpha, seed, min_size):
    expected = reference_dirichlet_partition(LABELS, num_clients, alpha, seed, min_size)
    assert same_parts(dirichlet_partition(LABELS, num_clients, alpha, seed, min_size), expected)
    order, offsets = dirichlet_split(LABELS, num_clients, alpha, seed, min_size)
    assert same_parts(np.split(order.astype(np.int64), offsets[1:-1]), expected)


def test_vectorised_dirichlet_equals_the_loop_on_mnist_over_3383_clients(shared_data):
    labels = np.load(shared_data / "mnist" / "mnist.npz")["y_train"].astype(np.int64)
    min_size = default_min_size(60_000, 3383)  # 3: the loop needs dozens of redraws here
    assert same_parts(dirichlet_partition(labels, 3383, 0.5, 0, min_size),
                      reference_dirichlet_partition(labels, 3383, 0.5, 0, min_size))


def test_tiled_dirichlet_is_the_split_of_the_repeated_labels():
    order, offsets = dirichlet_split(LABELS, 120, 0.5, 2, min_size=5, tile=4)
    expected = reference_dirichlet_partition(np.tile(LABELS, 4), 120, 0.5, 2, min_size=5)
    assert same_parts(np.split(order.astype(np.int64), offsets[1:-1]), expected)


@pytest.mark.parametrize("partition", ["dirichlet", "iid"])
def test_tile_maps_rows_into_range_and_keeps_client_sizes(partition):
    n, tile = LABELS.shape[0], 8
    small = label_partition(partition, LABELS, 30, 0.5, 0, "t")
    order, offsets = label_partition(partition, LABELS, 30 * tile, 0.5, 0, "t", tile=tile)
    assert offsets.shape == (30 * tile + 1,) and offsets[-1] == order.shape[0] == n * tile
    assert order.min() >= 0 and order.max() < n                     # real rows, no copy of the data
    assert np.array_equal(np.bincount(order, minlength=n), np.full(n, tile))  # every row exactly `tile` times
    sizes = np.diff(offsets)
    assert sizes.mean() == np.diff(small[1]).mean() == n / 30       # each client keeps its share
    assert sizes.min() >= (default_min_size(n * tile, 30 * tile) if partition == "dirichlet" else n // 30)
    again = label_partition(partition, LABELS, 30 * tile, 0.5, 0, "t", tile=tile)
    assert np.array_equal(again[0], order) and np.array_equal(again[1], offsets)


def test_tile_one_is_the_untiled_split():
    for partition in ("dirichlet", "iid"):
        order, offsets = label_partition(partition, LABELS, 40, 0.5, 1, "t", tile=1)
        parts = np.split(order.astype(np.int64), offsets[1:-1])
        expected = (reference_dirichlet_partition(LABELS, 40, 0.5, 1, default_min_size(3000, 40))
                    if partition == "dirichlet" else np.array_split(
                        np.random.default_rng([1, 1710]).permutation(3000), 40))
        assert same_parts(parts, expected)
    with pytest.raises(ValueError, match="tile must be >= 1"):
        label_partition("iid", LABELS, 40, 0.5, 1, "t", tile=0)


def test_csr_helpers_equal_the_list_forms():
    order, offsets = iid_split(1003, 10, seed=4)
    assert same_parts(np.split(order.astype(np.int64), offsets[1:-1]), iid_partition(1003, 10, seed=4))
    extra = [(2, np.array([0, 1])), (0, np.array([2])), (9, np.array([3, 4, 5]))]
    joined_order, joined_offsets = attach_rows(order, offsets, extra, offset=1003)
    expected = attach_to_clients(iid_partition(1003, 10, seed=4), extra, offset=1003)
    assert same_parts(np.split(joined_order.astype(np.int64), joined_offsets[1:-1]), expected)
    assert attach_rows(order, offsets, [], offset=1003)[0] is order


def test_client_partition_from_csr_is_int32_when_it_fits():
    order, offsets = iid_split(500, 7, seed=0)
    part = ClientPartition.from_csr(order, offsets)
    assert part.order.dtype == torch.int32 and part.offsets.dtype == torch.int64
    assert part.num_clients == 7 and part.sizes().sum() == 500
    rows = torch.randn(500, 3)
    assert torch.equal(rows.index_select(0, part.indices(3)), rows[torch.from_numpy(order[offsets[3]:offsets[4]])])
    big = ClientPartition.from_csr(np.array([0, 2**31], dtype=np.int64), np.array([0, 1, 2]))
    assert big.order.dtype == torch.int64


def test_default_min_size_shrinks_only_beyond_the_checked_k():
    assert [default_min_size(n, k) for n, k in ((240_000, 3383), (60_000, 3383), (60_000, 1000), (50_000, 200))] \
        == [10, 3, 10, 10]
    assert default_min_size(60_000 * 80, 80_000) == 5  # MNIST tiled 80 times: 10 is never met by 80,000 clients


def test_tile_is_validated_and_refused_by_tasks_that_cannot_tile(tmp_path):
    with pytest.raises(ConfigError, match="--data.tile must be an integer >= 1"):
        get_task_class("toy").make_settings(tmp_path, num_clients=10, tile=0)
    with pytest.raises(ConfigError, match="--data.tile=2: task 'sentiment140' cannot tile"):
        get_task_class("sentiment140").make_settings(tmp_path, num_clients=10, tile=2)
    with pytest.raises(ConfigError, match="--data.tile=3: task 'reddit' cannot tile"):
        get_task_class("reddit").make_settings(tmp_path, num_clients=10, tile=3)


def test_emnist_tile_keeps_one_copy_of_the_data(shared_data):
    settings = get_task_class("emnist").make_settings(shared_data, num_clients=2000, seed=0, source="mnist", tile=3,
                            attack_case="normal", download=False)
    data = get_task_class("emnist")(settings).build_data()
    assert data.train_inputs.shape[0] == 60_000 + 594                    # the data once, plus the honest sevens
    assert data.partition.order.dtype == torch.int32 and data.partition.order.numel() == 3 * 60_000 + 594
    counts = torch.bincount(data.partition.order.long(), minlength=60_594)
    assert torch.all(counts[:60_000] == 3) and torch.all(counts[60_000:] == 1)
    assert float(data.partition.sizes().float().mean()) == pytest.approx((3 * 60_000 + 594) / 2000)
    inputs, targets = data.client_data(5)
    assert inputs.shape[0] == targets.shape[0] == int(data.partition.sizes()[5])


def test_cli_accepts_tile_saves_it_and_rejects_zero(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(capsys, "fit", "--task", "toy", "--data.tile", "0")
    assert code == 2 and "--data.tile must be an integer >= 1" in err, err
    code, _, err = run_main(capsys, "fit", "--task", "sentiment140", "--data.tile", "2")
    assert code == 2 and "--data.tile=2" in err, err
    code, _, err = run_main(capsys, "fit", "--task", "toy", "--data.tile", "3", "--fl.num_clients", "60",
                            "--fl.rounds", "1", "--fl.clients_per_round", "4", "--fl.checkpoint_every", "0",
                            "--log.logger", "csv", "--log.progress_bar", "false", "--name", "tiled")
    assert code == 0, err
    saved = yaml.safe_load((tmp_path / "runs" / "tiled" / "config.yaml").read_text())
    assert saved["data"]["tile"] == 3 and saved["fl"]["num_clients"] == 60
    rows = (tmp_path / "runs" / "tiled" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3  # header, round 0, round 1
