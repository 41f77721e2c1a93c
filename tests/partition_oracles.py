"""The per-client list forms of the partitions: test oracles for the CSR splits of `tasks/partition.py`.

`dirichlet_partition` and `iid_partition` are the CSR splits cut into one array per client;
`natural_partition` (a per-user split by another route) and `attach_to_clients` (appending with
list operations) are independent implementations the CSR forms are compared with.
"""

from __future__ import annotations

import numpy as np

from fl_lightning.tasks.partition import dirichlet_split, iid_split


def dirichlet_partition(labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_size: int = 10,
                        max_draws: int = 10_000) -> list[np.ndarray]:
    """`dirichlet_split` as one int64 index array per client, shuffled."""
    order, offsets = dirichlet_split(labels, num_clients, alpha, seed, min_size, max_draws)
    return np.split(order.astype(np.int64), offsets[1:-1])


def iid_partition(num_examples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Uniform random split into `num_clients` near-equal shards."""
    order, offsets = iid_split(num_examples, num_clients, seed)
    return np.split(order.astype(np.int64), offsets[1:-1])


def natural_partition(user_ids: np.ndarray, num_clients: int | None = None, seed: int = 0,
                      min_size: int = 1) -> list[np.ndarray]:
    """Natural split: one client per user (writer, Twitter user, ...), as the data was produced.

    Users with fewer than `min_size` examples are dropped (their examples are assigned to nobody).
    When `num_clients` is given and smaller than the number of eligible users, that many users are
    drawn by seed (LEAF/TFF-style subsampling of users); clients come in ascending user-id order so
    the split does not depend on the order of the examples in the file.

    Args:
        user_ids: User of every training example, `[N]` (any sortable dtype: ints or strings).
        num_clients: How many users to keep, or None for all eligible users.
        seed: Seed of the user draw.
        min_size: Users with fewer examples are left out.

    Returns:
        One int64 index array per client (the user's examples, in file order).

    Raises:
        ValueError: More clients asked for than there are users with `min_size` examples.
    """
    user_ids = np.asarray(user_ids)
    users, inverse, counts = np.unique(user_ids, return_inverse=True, return_counts=True)
    eligible = np.flatnonzero(counts >= min_size)  # [n_eligible] positions into `users`
    if num_clients is not None:
        if num_clients > eligible.shape[0]:
            raise ValueError(f"num_clients={num_clients} exceeds the {eligible.shape[0]} users with at least "
                             f"{min_size} examples (of {users.shape[0]} users in all)")
        rng = np.random.default_rng([seed, 1711])
        eligible = np.sort(rng.choice(eligible, size=num_clients, replace=False))
    # A stable argsort groups the examples by user while keeping file order inside each user.
    order = np.argsort(inverse, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return [order[bounds[u]:bounds[u + 1]].astype(np.int64) for u in eligible]


def attach_to_clients(parts: list[np.ndarray], extra: list[tuple[int, np.ndarray]], offset: int) -> list[np.ndarray]:
    """Returns `parts` with each holder's extra items appended as rows `offset + item` (new arrays, no data copied)."""
    parts = list(parts)
    for client, items in extra:
        parts[client] = np.concatenate([parts[client], offset + items]).astype(np.int64)
    return parts
