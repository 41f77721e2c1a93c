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


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_balanced_slots_cover_every_position_once_within_the_gather_capacity(world_size):
    sizes = [5, 300, 12, 12, 80, 7, 150, 60, 9, 41, 33]
    per_rank = [slots_for_rank(len(sizes), rank, world_size, sizes) for rank in range(world_size)]
    assert sorted(s for slots in per_rank for s in slots) == list(range(len(sizes)))
    assert all(len(slots) <= -(-len(sizes) // world_size) for slots in per_rank)
    assert all(slots == sorted(slots) for slots in per_rank)


def test_balancing_shortens_the_slowest_rank():
    sizes = [400, 10, 380, 12, 20, 15, 350, 11]  # big clients on even slots: round-robin gives rank 0 all of them

    def slowest(assign):
        return max(sum(sizes[s] for s in assign(rank)) for rank in range(2))
    round_robin = slowest(lambda rank: slots_for_rank(len(sizes), rank, 2))
    balanced = slowest(lambda rank: slots_for_rank(len(sizes), rank, 2, sizes))
    # round-robin: rank 0 holds 400 + 380 + 20 + 350; balanced: 400 + 20 + 15 + 12 against 380 + 350 + 11 + 10
    assert round_robin == 1150 and balanced == 751
