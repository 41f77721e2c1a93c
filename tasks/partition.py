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

Every function is seeded with numpy's `default_rng`, so a split is pure in its arguments. The
`*_split` forms return the CSR layout of `ClientPartition` (`order`, `offsets`) as numpy arrays and
cost O(N) with no Python loop over the K clients except the final per-client shuffle, so K = 80,000
is cheap; `label_partition` (the vision tasks' dispatch) can also `tile` the training set: split
`N * tile` virtual rows and map each back with `% N`, so clients keep their size as K grows.
"""

from __future__ import annotations

import numpy as np


def dirichlet_split(labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_size: int = 10,
                    max_draws: int = 10_000, tile: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """`dirichlet_partition` in CSR form: `(order, offsets)`, client `c` holding `order[offsets[c]:offsets[c + 1]]`.

    Vectorised over clients (no Python loop over K per class or per redraw), and cheap in memory:
    a draw keeps only the clients' sizes, and the draw that succeeds is replayed from its saved
    random state to scatter every class's members straight into `order`. The result equals the
    per-client loop's exactly, for the same arguments.

    With `tile > 1` the split runs over `N * tile` virtual rows (the labels repeated `tile` times,
    never materialised); `order` then holds virtual row ids in `0..N * tile - 1` (`row % N` is the
    real row: `tiled_rows`).

    Returns:
        `order` `[N * tile]` (virtual) row ids, each client's shuffled, int32 when they fit (else int64);
        `offsets` `[num_clients + 1]` int64.
    """
    labels = np.asarray(labels)
    num_labels = labels.shape[0]
    num_rows = num_labels * tile
    if num_clients * min_size > num_rows:
        tiled = f" ({num_labels} x tile {tile})" if tile > 1 else ""
        raise ValueError(f"num_clients={num_clients} clients of at least {min_size} examples need "
                         f"{num_clients * min_size} examples; the training set has {num_rows}{tiled}")
    rng = np.random.default_rng([seed, 1709])
    cap = num_rows / num_clients
    classes = np.unique(labels)
    # Row ids as int32 when they fit: half the memory, and the same shuffles (they do not depend on the dtype).
    index = np.int32 if num_rows <= np.iinfo(np.int32).max else np.int64
    copies = np.arange(tile, dtype=index)[:, None] * index(num_labels)  # [tile, 1] row offset of each copy
    concentration = np.full(num_clients, alpha)

    def members_of(cls: np.ndarray) -> np.ndarray:
        """The (virtual) rows of one class in ascending order, as `np.flatnonzero(np.tile(labels, tile) == cls)`."""
        rows = np.flatnonzero(labels == cls).astype(index)
        return rows if tile == 1 else (rows[None, :] + copies).reshape(-1)

    def draw(scatter_into: np.ndarray | None = None, offsets: np.ndarray | None = None) -> np.ndarray:
        """One draw of the split: per class a permutation and a Dirichlet share; returns the sizes `[K]`.

        With `scatter_into`, also writes every class's members to their place in the CSR `order`
        (each client's pieces in class order, as the per-client loop concatenates them).
        """
        sizes = np.zeros(num_clients, dtype=np.int64)
        fill = None if offsets is None else offsets[:-1].copy()  # [K] next free slot of each client
        for cls in classes:
            members = rng.permutation(members_of(cls))
            share = rng.dirichlet(concentration) * (sizes < cap)
            share /= share.sum()
            cuts = (np.cumsum(share) * members.shape[0]).astype(np.int64)[:-1]
            # np.split(members, cuts) gives client j the piece members[bounds[j]:bounds[j + 1]].
            bounds = np.concatenate([[0], cuts, [members.shape[0]]])
            counts = np.diff(bounds)  # [K] >= 0: cumsum of shares >= 0 never decreases
            sizes += counts
            if scatter_into is not None:
                # Member i of client j's piece goes to fill[j] + (i - bounds[j]).
                dest = np.repeat((fill - bounds[:-1]).astype(index), counts)
                dest += np.arange(members.shape[0], dtype=index)
                scatter_into[dest] = members
                fill += counts
        return sizes

    for _ in range(max_draws):
        state = rng.bit_generator.state
        sizes = draw()
        if sizes.min() >= min_size:
            offsets = np.zeros(num_clients + 1, dtype=np.int64)
            np.cumsum(sizes, out=offsets[1:])
            order = np.empty(num_rows, dtype=index)
            rng.bit_generator.state = state  # replay the successful draw, now placing the members
            draw(order, offsets)
            bounds = offsets.tolist()
            for client in range(num_clients):  # the same stream as rng.permutation of each client's rows
                rng.shuffle(order[bounds[client]:bounds[client + 1]])
            return order, offsets
    raise RuntimeError(f"no Dirichlet(alpha={alpha}) split gives every one of {num_clients} clients "
                       f"{min_size} examples after {max_draws} draws; raise alpha or lower num_clients")


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
        One int64 index array per client, shuffled (views into one array: `dirichlet_split`).
    """
    order, offsets = dirichlet_split(labels, num_clients, alpha, seed, min_size, max_draws)
    return np.split(order.astype(np.int64), offsets[1:-1])


def iid_partition(num_examples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Uniform random split into `num_clients` near-equal shards."""
    order, offsets = iid_split(num_examples, num_clients, seed)
    return np.split(order.astype(np.int64), offsets[1:-1])


def iid_split(num_examples: int, num_clients: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`iid_partition` in CSR form `(order, offsets)`, `order` int32 when it fits.

    The first `num_examples % num_clients` shards are one longer (as `np.array_split`).
    """
    if num_clients > num_examples:
        raise ValueError(f"num_clients={num_clients} exceeds the {num_examples} training examples")
    order = np.random.default_rng([seed, 1710]).permutation(num_examples)
    order = order.astype(np.int32 if num_examples <= np.iinfo(np.int32).max else np.int64)
    small, extra = divmod(num_examples, num_clients)
    sizes = np.full(num_clients, small, dtype=np.int64)
    sizes[:extra] += 1
    offsets = np.zeros(num_clients + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    return order, offsets


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


def attach_rows(order: np.ndarray, offsets: np.ndarray, extra: list[tuple[int, np.ndarray]],
                offset: int) -> tuple[np.ndarray, np.ndarray]:
    """`attach_to_clients` in CSR form: each holder's items appended after its rows as rows `offset + item`."""
    if not extra:
        return order, offsets
    clients = np.concatenate([np.full(len(items), client, dtype=np.int64) for client, items in extra])
    rows = np.concatenate([offset + np.asarray(items, dtype=np.int64) for _, items in extra])
    # np.insert keeps the given order of values inserted at one position (it sorts positions stably).
    order = np.insert(order, offsets[clients + 1], rows)
    offsets = offsets + np.concatenate([[0], np.cumsum(np.bincount(clients, minlength=offsets.shape[0] - 1))])
    return order, offsets


def default_min_size(num_examples: int, num_clients: int, preferred: int = 10,
                     reference_clients: int = 3383) -> int:
    """The Dirichlet split's minimum client size: the reference's 10, lowered for small data sets and huge K.

    With alpha = 0.5 a client's size is roughly Gamma-distributed around the mean N/K, so a minimum
    above about a fifth of the mean is practically never met by all K clients at once (MNIST over
    the EMNIST preset's 3383 clients averages 17.7 examples: a minimum of 10 fails 10,000 draws in a
    row). The minimum is therefore `min(preferred, (N // K) // 5)`, at least 1: 10 for EMNIST
    (mean 71) and CIFAR-10 (mean 250), 3 for MNIST over 3383 clients.

    That rule leaves a few clients per draw below the minimum (about 3 for MNIST over 3383 clients,
    so about 40 draws). The number below a given size grows with K, so beyond `reference_clients`
    (the largest K the rule was checked at) the minimum shrinks as `(reference_clients / K) ** (1/4)`:
    near the bottom, the count of clients below size t grows about as t**4 (measured over 10 draws of
    MNIST tiled 80 times over 80,000 clients, mean 60: 1.1, 2.7, 6.2, 13, 24, 37, 63 clients below
    4..10). There the minimum is 5 instead of an unreachable 10 (63 clients below 10 in every draw).
    For K <= `reference_clients` the rule is unchanged.
    """
    mean = num_examples // num_clients
    size = min(preferred, mean // 5)
    if num_clients > reference_clients:
        size = min(size, int(mean / 5 * (reference_clients / num_clients) ** 0.25))
    return max(1, size)


def tiled_rows(order: np.ndarray, num_examples: int, tile: int) -> np.ndarray:
    """Virtual row ids of a training set repeated `tile` times, mapped back to real rows (`% num_examples`).

    Works in place and returns `order`; a no-op for `tile == 1`.
    """
    if tile > 1:
        np.remainder(order, num_examples, out=order)
    return order


def label_partition(partition: str, labels: np.ndarray, num_clients: int, alpha: float, seed: int,
                    task_name: str, tile: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The `dirichlet` or `iid` split of a labelled dataset without user ids (the vision tasks), as CSR.

    Args:
        partition: `dirichlet` or `iid`.
        labels: Class of every training example, `[N]`.
        num_clients: K.
        alpha: Dirichlet concentration.
        seed: Seed of the split.
        task_name: For error messages.
        tile: Split `tile` copies of the training set (`N * tile` virtual rows), so that clients keep
            their size as K grows (scale benchmarks); rows are mapped back with `% N`, nothing is copied.

    Returns:
        `(order, offsets)`: client `c` holds rows `order[offsets[c]:offsets[c + 1]]` (in `0..N - 1`;
        int32 or int64, see `dirichlet_split` and `iid_split`).

    Raises:
        ValueError: For `natural` (these datasets carry no user ids) or an unknown name.
    """
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    num_examples = int(np.asarray(labels).shape[0])
    if partition == "dirichlet":
        order, offsets = dirichlet_split(labels, num_clients, alpha, seed, tile=tile,
                                         min_size=default_min_size(num_examples * tile, num_clients))
    elif partition == "iid":
        order, offsets = iid_split(num_examples * tile, num_clients, seed)
    elif partition == "natural":
        raise ValueError(f"partition 'natural' needs user ids, which task {task_name!r} does not have; "
                         "use 'dirichlet' (the paper's) or 'iid'")
    else:
        raise ValueError(f"unknown partition {partition!r} for task {task_name!r}; allowed: dirichlet, iid")
    return tiled_rows(order, num_examples, tile), offsets
