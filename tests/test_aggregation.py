"""FedAvg and the aggregation contract on hand-computed numbers."""

import pytest
import torch

from fl_lightning import kernels
from fl_lightning.aggregation import FedAvg
from fl_lightning.kernels import weighted_sum


def test_fedavg_hand_computed():
    # arrange: three clients with 10, 30 and 60 examples
    deltas = torch.tensor([[1.0, 0.0, -2.0], [0.0, 2.0, 2.0], [1.0, 1.0, 0.0]])
    weights = torch.tensor([10.0, 30.0, 60.0])
    # act
    result = FedAvg()(deltas, weights, torch.Generator())
    # assert: 0.1*[1,0,-2] + 0.3*[0,2,2] + 0.6*[1,1,0] = [0.7, 1.2, 0.4]
    torch.testing.assert_close(result.update, torch.tensor([0.7, 1.2, 0.4]))
    torch.testing.assert_close(result.client_weights, torch.tensor([0.1, 0.3, 0.6]))


def test_fedavg_does_not_depend_on_client_order():
    gen = torch.Generator().manual_seed(0)
    deltas, weights = torch.randn(7, 50, generator=gen), torch.randint(1, 100, (7,), generator=gen).float()
    perm = torch.randperm(7, generator=gen)
    a = FedAvg()(deltas, weights, gen).update
    b = FedAvg()(deltas[perm], weights[perm], gen).update
    torch.testing.assert_close(a, b)


def test_weighted_sum_matches_matrix_product():
    rows, weights = torch.randn(5, 1000, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
    torch.testing.assert_close(weighted_sum(rows, weights), weights @ rows)


def test_wide_weighted_sum_by_column_chunks_is_bitwise_the_whole_row_sum(monkeypatch):
    rows, weights = torch.randn(6, 1000), [0.5, 0.0, 0.25, 1e-3, 0.125, 0.3]
    whole = torch.zeros(1000, dtype=torch.float64)
    for weight, row in zip(weights, rows):
        if weight:
            whole.add_(row, alpha=weight)
    monkeypatch.setattr(kernels, "WIDE_SUM_CHUNK", 96)  # chunks plus a short last one
    chunked = weighted_sum(rows, weights, torch.float64)
    assert chunked.dtype == torch.float64 and torch.equal(chunked, whole)


def test_aggregator_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="expected deltas"):
        FedAvg()(torch.zeros(3, 4), torch.ones(2), torch.Generator())
