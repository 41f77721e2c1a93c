"""Partitions of a training set over K clients, as index arrays (never copies of the data).

`dirichlet_partition` is the "hetero-dir" label-skew split the paper's code uses for CIFAR-10 and
EMNIST (it follows Sun et al., "Can You Really Backdoor Federated Learning?", arXiv:1911.07963; and
Hsu et al., arXiv:1909.06335): per class a Dirichlet(alpha) share vector over clients, zeroed
for clients that already hold N/K examples, renormalised; everything redrawn until every client
holds at least `min_size` examples. Seeded with numpy's `default_rng`, so the split is pure in
its arguments.
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
