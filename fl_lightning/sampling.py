"""Who trains in a round, on which rank, with which random numbers: pure functions of the seed.

Everything random in a run derives from `(seed, round_idx, client_id)` through numpy's
`SeedSequence`, never from a process-wide generator. So the same config gives the same clients,
the same batches and the same dropout masks on 1 or N processes and after a resume (FedJAX
derives its per-round randomness the same way).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Distinct streams for distinct purposes, so that e.g. client selection and local training never
# draw the same numbers.
_SELECT, _CLIENT, _SERVER = 0x5E1EC7, 0xC11E47, 0x5E4E4


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (e.g. seed, round, client), well mixed by `SeedSequence`."""
    return int(np.random.SeedSequence([int(k) & 0xFFFF_FFFF_FFFF_FFFF for k in keys]).generate_state(
        1, np.uint64)[0] >> np.uint64(1))


def sample_clients(seed: int, round_idx: int, num_clients: int, clients_per_round: int) -> list[int]:
    """The round's clients: `clients_per_round` distinct ids from `range(num_clients)`, uniformly.

    Pure in its arguments; costs O(clients_per_round), not O(num_clients), so K = 80,000 is as cheap
    as K = 100.
    """
    if not 0 < clients_per_round <= num_clients:
        raise ValueError(f"clients_per_round={clients_per_round} must be in 1..num_clients={num_clients}")
    rng = np.random.default_rng(derive_seed(_SELECT, seed, round_idx))
    return [int(c) for c in rng.choice(num_clients, size=clients_per_round, replace=False)]


def client_seed(seed: int, round_idx: int, client_id: int, slot: int) -> int:
    """Seed of one client's local training (shuffling, dropout, augmentation) in one round.

    The slot is part of the key so that two participants with the same id in one round (a virtual
    attacker beside its honest twin) still draw independent numbers.
    """
    return derive_seed(_CLIENT, seed, round_idx, client_id, slot)


def server_seed(seed: int, round_idx: int) -> int:
    """Seed of the server's random draws in one round (e.g. weak-DP noise)."""
    return derive_seed(_SERVER, seed, round_idx)


def slots_for_rank(num_slots: int, rank: int, world_size: int, sizes: Sequence[int] | None = None) -> list[int]:
    """Slots (positions in the round's client list) this rank trains, in ascending order.

    Without `sizes`, dealt round-robin. With `sizes` (the work of each slot, e.g. its example
    count), balanced by the longest-processing-time rule: slots by decreasing size (ties: lower
    slot first), each to the rank with the least work so far (ties: lower rank) among those holding
    fewer than `ceil(num_slots / world_size)` slots (the gather pads every rank to that count). A
    round waits for its slowest rank, and client sizes are skewed (Dirichlet splits), so this
    shortens rounds on several processes. Which rank trains a slot never changes the result: a
    client's randomness comes from (seed, round, client, slot), and updates are gathered in slot order.
    """
    if sizes is None:
        return list(range(rank, num_slots, world_size))
    capacity = -(-num_slots // world_size)
    load, count, mine = [0] * world_size, [0] * world_size, []
    for slot in sorted(range(num_slots), key=lambda s: (-sizes[s], s)):
        target = min((r for r in range(world_size) if count[r] < capacity), key=lambda r: (load[r], r))
        load[target] += sizes[slot]
        count[target] += 1
        if target == rank:
            mine.append(slot)
    return sorted(mine)
