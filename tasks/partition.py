"""Partitions of a training set over K clients, as index arrays (never copies of the data).

* `dirichlet_partition`: the "hetero-dir" label-skew split the paper's code uses for CIFAR-10 and
  EMNIST (it follows Sun et al., "Can You Really Backdoor Federated Learning?", arXiv:1911.07963;
  and Hsu et al., arXiv:1909.06335): per class a Dirichlet(alpha) share vector over clients,
  zeroed for clients that already hold N/K examples, renormalised; everything redrawn until every
  client holds at least `min_size` examples (`default_min_size` picks it).
* `iid_partition`: a uniform random split into near-equal shards.
* `natural_partition`: one client per user (writer, Twitter user) when the data has user ids, as
  in LEAF (Caldas et al., arXiv:1812.01097).
* `spread_over_holders` / `attach_to_clients`: deal extra examples (the honest clients' edge-case
  examples of the almost-edge and normal attack cases, Wang et al., NeurIPS 2020, arXiv:2007.05084)
  to clients drawn by seed, as extra rows appended to the training tensors.

Every function is seeded with numpy's `default_rng`, so a split is pure in its arguments.
"""

from __future__ import annotations

import numpy as np


def dirichlet_partition(labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_size: int = 10,
                        max_draws: int = 10_000) -> list[np.ndarray]:
    """Label-skewed split of `labels` over `num_clients` clients.

    Args:
        labels: Class of every training example, `[N]`.
        num_clients: K.
        alpha: Dirichlet concentration (0.5 in the paper; smaller is more skewed).
        seed: Seed of the draw.
        min_size: Every client must end with at least this many examples.
        max_draws: Give up (with an error) after this many redraws.

    Returns:
        One int64 index array per client, shuffled.
    """
    labels = np.asarray(labels)
    if num_clients * min_size > labels.shape[0]:
        raise ValueError(f"num_clients={num_clients} clients of at least {min_size} examples need "
                         f"{num_clients * min_size} examples; the training set has {labels.shape[0]}")
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
    raise RuntimeError(f"no Dirichlet(alpha={alpha}) split gives every one of {num_clients} clients "
                       f"{min_size} examples after {max_draws} draws; raise alpha or lower num_clients")


def iid_partition(num_examples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Uniform random split into `num_clients` near-equal shards."""
    if num_clients > num_examples:
        raise ValueError(f"num_clients={num_clients} exceeds the {num_examples} training examples")
    perm = np.random.default_rng([seed, 1710]).permutation(num_examples).astype(np.int64)
    return np.array_split(perm, num_clients)


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


def spread_over_holders(num_items: int, num_clients: int, num_holders: int, seed: int,
                        group_size: int = 1, salt: int = 0) -> list[tuple[int, np.ndarray]]:
    """Deals `num_items` extra examples (e.g. honest clients' edge examples) to holders drawn by seed.

    The paper's normal / almost-edge cases give the honest edge examples to the first user ids
    0..n-1 (paper-spec Q29); drawing the holders at random keeps their participation independent
    of how ids were assigned. Items stay in consecutive groups of `group_size` (the Southwest sets
    are groups of 4: a photo and its three rotations), and the groups are split over the holders
    with `np.array_split`, as the reference does.

    Args:
        num_items: Number of extra examples (a multiple of `group_size`).
        num_clients: K; holders are drawn from `0..K-1` without replacement.
        num_holders: How many clients receive items (capped at K and at the number of groups).
        seed: Seed of the holder draw.
        group_size: Items that must stay together.
        salt: Separates independent draws that share one seed.

    Returns:
        `(client_id, item_indices)` per holder, `item_indices` into the extra examples, `[n_i]` int64.
    """
    if num_items % group_size:
        raise ValueError(f"num_items={num_items} is not a multiple of group_size={group_size}")
    num_groups = num_items // group_size
    num_holders = min(num_holders, num_clients, num_groups)
    if num_holders <= 0:
        return []
    rng = np.random.default_rng([seed, 1712, salt])
    holders = rng.choice(num_clients, size=num_holders, replace=False)
    groups = np.arange(num_items, dtype=np.int64).reshape(num_groups, group_size)  # [n_groups, group_size]
    chunks = np.array_split(groups, num_holders)
    return [(int(client), chunk.reshape(-1)) for client, chunk in zip(holders, chunks, strict=True)]


def attach_to_clients(parts: list[np.ndarray], extra: list[tuple[int, np.ndarray]], offset: int) -> list[np.ndarray]:
    """Returns `parts` with each holder's extra items appended as rows `offset + item` (new arrays, no data copied)."""
    parts = list(parts)
    for client, items in extra:
        parts[client] = np.concatenate([parts[client], offset + items]).astype(np.int64)
    return parts


def default_min_size(num_examples: int, num_clients: int, preferred: int = 10) -> int:
    """The Dirichlet split's minimum client size: the reference's 10, lowered for small data sets.

    With alpha = 0.5 a client's size is roughly Gamma-distributed around the mean N/K, so a minimum
    above about a fifth of the mean is practically never met by all K clients at once (MNIST over
    the EMNIST preset's 3383 clients averages 17.7 examples: a minimum of 10 fails 10,000 draws in a
    row). The minimum is therefore `min(preferred, (N // K) // 5)`, at least 1: 10 for EMNIST
    (mean 71) and CIFAR-10 (mean 250), 3 for MNIST over 3383 clients.
    """
    return max(1, min(preferred, (num_examples // num_clients) // 5))


def label_partition(partition: str, labels: np.ndarray, num_clients: int, alpha: float, seed: int,
                    task_name: str) -> list[np.ndarray]:
    """The `dirichlet` or `iid` split of a labelled dataset without user ids (the vision tasks).

    Raises:
        ValueError: For `natural` (these datasets carry no user ids) or an unknown name.
    """
    num_examples = int(np.asarray(labels).shape[0])
    if partition == "dirichlet":
        return dirichlet_partition(labels, num_clients, alpha, seed,
                                   min_size=default_min_size(num_examples, num_clients))
    if partition == "iid":
        return iid_partition(num_examples, num_clients, seed)
    if partition == "natural":
        raise ValueError(f"partition 'natural' needs user ids, which task {task_name!r} does not have; "
                         "use 'dirichlet' (the paper's) or 'iid'")
    raise ValueError(f"unknown partition {partition!r} for task {task_name!r}; allowed: dirichlet, iid")
