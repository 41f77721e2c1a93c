"""Partitions of a training set over K clients, as CSR index arrays (never copies of the data).

Every split returns the layout of `ClientPartition`: `(order, offsets)`, client `c` holding rows
`order[offsets[c]:offsets[c + 1]]`, as numpy arrays.

* `dirichlet_split`: the "hetero-dir" label-skew split the paper's code uses for CIFAR-10 and
  EMNIST (it follows Sun et al., "Can You Really Backdoor Federated Learning?", arXiv:1911.07963;
  and Hsu et al., arXiv:1909.06335): per class a Dirichlet(alpha) share vector over clients,
  zeroed for clients that already hold N/K examples, renormalised; everything redrawn until every
  client holds at least `min_size` examples (`default_min_size` picks it).
* `iid_split`: a uniform random split into near-equal shards.
* `grouped_split`: one client per user (Twitter user, Reddit author) when the data has user ids, as
  in LEAF (Caldas et al., arXiv:1812.01097).
* `spread_over_holders` / `attach_rows`: deal extra examples (the honest clients' edge-case
  examples of the almost-edge and normal attack cases, Wang et al., NeurIPS 2020, arXiv:2007.05084)
  to clients drawn by seed, as extra rows appended to the training tensors.

Every function is seeded with numpy's `default_rng`, so a split is pure in its arguments. The splits
cost O(N) (a sort for `grouped_split`) with no Python loop over the K clients except the final
per-client shuffle, so K = 80,000 is cheap; `label_partition` (the vision tasks' dispatch) can also
`tile` the training set: split `N * tile` virtual rows and map each back with `% N`, so clients keep
their size as K grows. The per-client list forms the splits were checked against live in the tests
(`tests/partition_oracles.py`).
"""

from __future__ import annotations

import numpy as np


def dirichlet_split(labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_size: int = 10,
                    max_draws: int = 10_000, tile: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Label-skewed split of `labels` over `num_clients` clients, as CSR `(order, offsets)`.

    Vectorised over clients (no Python loop over K per class or per redraw), and cheap in memory:
    a draw keeps only the clients' sizes, and the draw that succeeds is replayed from its saved
    random state to scatter every class's members straight into `order`. The result equals the
    per-client loop's exactly, for the same arguments.

    Args:
        labels: Class of every training example, `[N]`.
        num_clients: K.
        alpha: Dirichlet concentration (0.5 in the paper; smaller is more skewed).
        seed: Seed of the draw.
        min_size: Every client must end with at least this many examples.
        max_draws: Give up (with an error) after this many redraws.
        tile: See below.

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


def iid_split(num_examples: int, num_clients: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Uniform random split into `num_clients` near-equal shards, as CSR `(order, offsets)`, `order` int32 when it fits.

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


def spread_over_holders(num_items: int, num_clients: int, num_holders: int, seed: int,
                        group_size: int = 1, salt: int = 0) -> list[tuple[int, np.ndarray]]:
    """Deals `num_items` extra examples (e.g. honest clients' edge examples) to holders drawn by seed.

    The paper's normal / almost-edge cases give the honest edge examples to the first user ids
    0..n-1 (Q29 in `docs/reference-deviations.md`); drawing the holders at random keeps their participation independent
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


def grouped_split(groups: np.ndarray, num_clients: int, seed: int, min_size: int = 1,
                  candidates: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Natural split in CSR form: one client per group (Twitter user, Reddit author), `num_clients` groups drawn.

    Built with one stable sort, so time and memory grow with the number of examples and never loop
    over the K clients (unlike the list oracle `natural_partition` of the tests, which also orders
    clients by group id rather than by draw).

    Args:
        groups: Group id of every example, `[N]` (integer ids; negative ids are never drawn).
        num_clients: K, the number of groups to draw (clients are numbered in draw order).
        seed: Seed of the draw.
        min_size: Only groups with at least this many examples can be drawn.
        candidates: Restrict the draw to these group ids (None: all).

    Returns:
        `order` (int64 rows, client after client, each client's in their original order), `offsets`
        `[num_clients + 1]` int64, and the drawn group ids `[num_clients]` (client c = the c-th drawn).
    """
    groups = np.asarray(groups, dtype=np.int64)
    ids, counts = np.unique(groups, return_counts=True)
    eligible = ids[(counts >= min_size) & (ids >= 0)]
    if candidates is not None:
        eligible = np.intersect1d(eligible, candidates)
    if eligible.shape[0] < num_clients:
        raise ValueError(f"num_clients={num_clients} exceeds the {eligible.shape[0]} users/authors with at least "
                         f"{min_size} examples; lower num_clients (or the minimum) for the natural partition")
    chosen = np.random.default_rng([seed, 1711]).choice(eligible, size=num_clients, replace=False)
    # Client of every example (-1: not drawn), by a sorted lookup instead of a dict over groups.
    sorter = np.argsort(chosen)
    pos = np.searchsorted(chosen, groups, sorter=sorter).clip(max=num_clients - 1)
    client = np.where(chosen[sorter[pos]] == groups, sorter[pos], -1)
    keep = np.flatnonzero(client >= 0)
    order = keep[np.argsort(client[keep], kind="stable")].astype(np.int64)
    offsets = np.zeros(num_clients + 1, dtype=np.int64)
    np.cumsum(np.bincount(client[keep], minlength=num_clients), out=offsets[1:])
    return order, offsets, chosen


def attach_rows(order: np.ndarray, offsets: np.ndarray, extra: list[tuple[int, np.ndarray]],
                offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Each holder's items appended after its own rows, as rows `offset + item` (`order` keeps its dtype).

    `extra` is `spread_over_holders`'s `(client_id, item_indices)` list; a client may appear more than
    once, and its items then follow in the order given.
    """
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
