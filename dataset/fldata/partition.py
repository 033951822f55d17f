"""Splits a labelled dataset's sample indices over federated clients.

Modes: ``iid`` (uniform), ``pat`` (pathological: a few classes per client), ``dir`` (practical:
per-class Dirichlet(alpha) proportions over all clients) and ``exdir`` (a few classes per client,
each class split over its holders with Dirichlet(alpha)).
"""
import math
from functools import partial

import numpy as np

from fldata.errors import DatasetError

PARTITIONS = ("iid", "pat", "dir", "exdir")


class PartitionError(DatasetError):
    """The parameters admit no partition, or none was found within the retry budget."""


def default_min_samples(num_samples: int, num_clients: int, batch_size: int = 10,
                        train_ratio: float = 0.75) -> int:
    """Smallest client a Dirichlet split may produce: one test batch, at most half an even share."""
    return max(1, int(min(batch_size / (1 - train_ratio), num_samples / num_clients / 2)))


def validate_partition_params(num_clients: int, num_classes: int, partition: str,
                              class_per_client: int, alpha: float) -> None:
    """Raises PartitionError naming the option to fix; checks only what ``partition`` uses."""
    if partition not in PARTITIONS:
        raise PartitionError(f"unknown partition {partition!r}; pass --partition as one of {', '.join(PARTITIONS)}")
    if num_clients < 1:
        raise PartitionError(f"--num-clients must be >= 1, got {num_clients}")
    if num_classes < 1:
        raise PartitionError(f"num_classes must be >= 1, got {num_classes}")
    if partition in ("pat", "exdir") and not 1 <= class_per_client <= num_classes:
        raise PartitionError(f"--class-per-client must be in [1, {num_classes}], got {class_per_client}")
    if partition in ("dir", "exdir") and not (alpha > 0 and math.isfinite(alpha)):
        raise PartitionError(f"--alpha must be a positive number, got {alpha}")
    if partition == "exdir" and num_clients * class_per_client < num_classes:
        raise PartitionError(
            f"exdir needs --num-clients x --class-per-client >= {num_classes} so that every class has a "
            f"holder, got {num_clients} x {class_per_client}; raise one of them")


def partition_indices(labels: np.ndarray, num_clients: int, num_classes: int, partition: str,
                      balance: bool, class_per_client: int, alpha: float, rng: np.random.Generator,
                      min_samples: int | None = None, max_retries: int = 1000) -> list[np.ndarray]:
    """Returns one int64 index array per client; no index appears twice.

    ``balance`` applies to iid and pat; ``min_samples`` (default: ``default_min_samples``) and
    ``max_retries`` bound the Dirichlet resampling of dir and exdir.
    """
    validate_partition_params(num_clients, num_classes, partition, class_per_client, alpha)
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise PartitionError(f"labels must be a 1-D integer array, got shape {labels.shape} of {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise PartitionError(f"labels must lie in [0, {num_classes}), found {labels.min()}..{labels.max()}")
    if labels.size < num_clients:
        raise PartitionError(f"{labels.size} samples cannot give each of {num_clients} clients one; "
                             f"lower --num-clients")
    class_indices = [np.flatnonzero(labels == c) for c in range(num_classes)]

    if partition == "iid":
        return _split(rng.permutation(labels.size), num_clients, balance, rng)
    if partition == "pat":
        return _pathological(class_indices, num_clients, class_per_client, balance, rng)

    if min_samples is None:
        min_samples = default_min_samples(labels.size, num_clients)
    if min_samples * num_clients > labels.size:
        raise PartitionError(f"{labels.size} samples cannot give each of {num_clients} clients "
                             f">= {min_samples}; lower --num-clients")
    if max_retries < 1:
        raise PartitionError(f"max_retries must be >= 1, got {max_retries}")
    class_sizes = np.array([len(idx) for idx in class_indices])
    if partition == "dir":
        draw_counts = partial(_dirichlet_counts, class_sizes, num_clients, alpha, rng)
        fix = "raise --alpha or lower --num-clients"
    else:
        holders = _holders(_deal_classes(num_clients, num_classes, class_per_client, rng), num_classes)
        draw_counts = partial(_extended_dirichlet_counts, class_sizes, holders, num_clients, alpha, rng)
        fix = "raise --alpha or --class-per-client, or lower --num-clients"
    for _ in range(max_retries):
        counts = draw_counts()
        if counts.sum(axis=0).min() >= min_samples:
            return _deal_counts(class_indices, counts, rng)
    raise PartitionError(f"Dirichlet partition ({partition}) found no split giving every client >= {min_samples} "
                         f"samples in {max_retries} tries; {fix}")


def _cut_counts(total: int, weights: np.ndarray) -> np.ndarray:
    """Splits ``total`` items into counts proportional to non-negative ``weights`` (floored cut points)."""
    cuts = (np.cumsum(weights) / weights.sum() * total).astype(np.int64)
    cuts[-1] = total
    return np.diff(cuts, prepend=0)


def _split(indices: np.ndarray, parts: int, balance: bool, rng: np.random.Generator) -> list[np.ndarray]:
    """Equal chunks (sizes differ by at most one) if balance, else random sizes of at least a tenth of an even share."""
    total = len(indices)
    if balance:
        counts = np.full(parts, total // parts)
        counts[: total % parts] += 1
    else:
        floor = max(1, total // (10 * parts))
        counts = floor + _cut_counts(total - floor * parts, rng.random(parts))
    return np.split(indices.astype(np.int64), np.cumsum(counts)[:-1])


def _deal_classes(num_clients: int, num_classes: int, class_per_client: int,
                  rng: np.random.Generator) -> list[np.ndarray]:
    """Deals a shuffled class deck round-robin, so every class is dealt once clients x classes-per-client allow."""
    deck = rng.permutation(num_classes)
    return [deck[(i * class_per_client + np.arange(class_per_client)) % num_classes] for i in range(num_clients)]


def _holders(client_classes: list[np.ndarray], num_classes: int) -> list[list[int]]:
    holders = [[] for _ in range(num_classes)]
    for client, classes in enumerate(client_classes):
        for c in classes:
            holders[c].append(client)
    return holders


def _pathological(class_indices: list[np.ndarray], num_clients: int, class_per_client: int, balance: bool,
                  rng: np.random.Generator) -> list[np.ndarray]:
    holders = _holders(_deal_classes(num_clients, len(class_indices), class_per_client, rng), len(class_indices))
    chunks = [[] for _ in range(num_clients)]
    for c, indices in enumerate(class_indices):
        if not holders[c]:
            continue
        if len(indices) < len(holders[c]):
            raise PartitionError(f"class {c} has {len(indices)} samples for {len(holders[c])} clients; "
                                 f"lower --num-clients or --class-per-client")
        for client, chunk in zip(holders[c], _split(rng.permutation(indices), len(holders[c]), balance, rng)):
            chunks[client].append(chunk)
    return [np.concatenate(parts) for parts in chunks]


def _dirichlet_counts(class_sizes: np.ndarray, num_clients: int, alpha: float,
                      rng: np.random.Generator) -> np.ndarray:
    """Per class, Dirichlet proportions over the clients that do not yet hold an even share of the data."""
    counts = np.zeros((len(class_sizes), num_clients), dtype=np.int64)
    totals = np.zeros(num_clients, dtype=np.int64)
    even_share = class_sizes.sum() / num_clients
    for c, size in enumerate(class_sizes):
        if size == 0:
            continue
        open_clients = totals < even_share
        weights = rng.dirichlet(np.full(num_clients, alpha)) * open_clients
        if weights.sum() == 0:  # tiny alpha can put all mass on full clients
            weights = open_clients.astype(float)
        counts[c] = _cut_counts(size, weights)
        totals += counts[c]
    return counts


def _extended_dirichlet_counts(class_sizes: np.ndarray, holders: list[list[int]], num_clients: int, alpha: float,
                               rng: np.random.Generator) -> np.ndarray:
    """Per class, Dirichlet proportions over the clients dealt that class."""
    counts = np.zeros((len(class_sizes), num_clients), dtype=np.int64)
    for c, size in enumerate(class_sizes):
        counts[c, holders[c]] = _cut_counts(size, rng.dirichlet(np.full(len(holders[c]), alpha)))
    return counts


def _deal_counts(class_indices: list[np.ndarray], counts: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Hands out each class's shuffled samples in the given per-client counts."""
    chunks = [[] for _ in range(counts.shape[1])]
    for c, indices in enumerate(class_indices):
        pieces = np.split(rng.permutation(indices), np.cumsum(counts[c])[:-1])
        for client, piece in enumerate(pieces):
            chunks[client].append(piece.astype(np.int64))
    return [np.concatenate(parts) for parts in chunks]
