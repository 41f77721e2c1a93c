"""Client selection and per-client seeds are pure functions of (seed, round, client)."""

import time

import pytest

from fl_lightning.sampling import client_seed, sample_clients, server_seed, slots_for_rank


def test_same_seed_and_round_give_same_clients():
    assert sample_clients(3, 7, 200, 10) == sample_clients(3, 7, 200, 10)


def test_clients_are_distinct_and_in_range():
    clients = sample_clients(0, 1, 50, 50)
    assert sorted(clients) == list(range(50))


def test_rounds_and_seeds_differ():
    assert sample_clients(0, 1, 1000, 30) != sample_clients(0, 2, 1000, 30)
    assert sample_clients(0, 1, 1000, 30) != sample_clients(1, 1, 1000, 30)


def test_selection_is_roughly_uniform():
    counts = [0] * 20
    for round_idx in range(1, 2001):
        for c in sample_clients(0, round_idx, 20, 5):
            counts[c] += 1
    # each client expected 500 times; a 5-sigma band (sd ~ 19)
    assert all(400 < c < 600 for c in counts), counts


def test_selection_cost_does_not_grow_with_num_clients():
    def timed(num_clients):
        start = time.perf_counter()
        for r in range(200):
            sample_clients(0, r + 1, num_clients, 100)
        return time.perf_counter() - start

    assert timed(80_000) < 5 * timed(1_000) + 0.05


def test_bad_clients_per_round():
    with pytest.raises(ValueError, match="clients_per_round"):
        sample_clients(0, 1, 10, 11)


def test_client_and_server_seeds_are_pure_and_distinct():
    assert client_seed(0, 1, 5, 0) == client_seed(0, 1, 5, 0)
    assert len({client_seed(0, 1, 5, 0), client_seed(0, 1, 5, 1), client_seed(0, 2, 5, 0), server_seed(0, 1)}) == 4


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_slots_cover_every_position_once(world_size):
    slots = [s for rank in range(world_size) for s in slots_for_rank(10, rank, world_size)]
    assert sorted(slots) == list(range(10))
