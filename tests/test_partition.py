"""Label-skew partitions (dataset/fldata/partition.py) and the per-client train/test split."""
import time

import numpy as np
import pytest

from fldata.dataset_io import split_train_test
from fldata.errors import DatasetError
from fldata.partition import PARTITIONS, PartitionError, default_min_samples, partition_indices

NUM_CLASSES = 10


@pytest.fixture
def labels():
    """1,000 shuffled labels, 100 per class."""
    return np.random.default_rng(0).permutation(np.repeat(np.arange(NUM_CLASSES), 100))


def make_partition(labels, partition, num_clients=10, balance=False, class_per_client=2, alpha=0.5, seed=0,
                   **kwargs):
    return partition_indices(labels, num_clients, NUM_CLASSES, partition, balance, class_per_client, alpha,
                             np.random.default_rng(seed), **kwargs)


def classes_of(labels, parts):
    return [set(labels[part].tolist()) for part in parts]


@pytest.mark.parametrize("partition", PARTITIONS)
def test_every_sample_assigned_exactly_once(labels, partition):
    parts = make_partition(labels, partition)
    assert len(parts) == 10
    assert all(part.dtype == np.int64 for part in parts)
    assigned = np.concatenate(parts)
    assert len(assigned) == len(np.unique(assigned)) == len(labels)  # every class has a holder here
    assert assigned.min() >= 0 and assigned.max() < len(labels)
    assert min(len(part) for part in parts) >= 1


@pytest.mark.parametrize("partition", PARTITIONS)
def test_same_seed_same_partition_other_seed_differs(labels, partition):
    first, again, other = (make_partition(labels, partition, seed=seed) for seed in (3, 3, 4))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


@pytest.mark.parametrize("class_per_client", [1, 2, 3])
def test_pat_gives_each_client_its_classes_and_uses_every_class(labels, class_per_client):
    parts = make_partition(labels, "pat", class_per_client=class_per_client)
    held = classes_of(labels, parts)
    assert all(len(classes) == class_per_client for classes in held)
    assert set().union(*held) == set(range(NUM_CLASSES))


def test_pat_with_few_clients_leaves_unheld_classes_out(labels):
    parts = make_partition(labels, "pat", num_clients=2, class_per_client=2)
    held = set().union(*classes_of(labels, parts))
    assert len(held) == 4
    assert sum(len(part) for part in parts) == 400  # all samples of the 4 held classes, nothing else


@pytest.mark.parametrize("class_per_client", [2, 4])
def test_exdir_respects_class_per_client_and_covers_every_class(labels, class_per_client):
    parts = make_partition(labels, "exdir", class_per_client=class_per_client, alpha=1.0)
    held = classes_of(labels, parts)
    assert all(1 <= len(classes) <= class_per_client for classes in held)
    assert set().union(*held) == set(range(NUM_CLASSES))


@pytest.mark.parametrize("partition", ["iid", "pat"])
def test_balance_gives_equal_sizes(labels, partition):
    balanced = [len(part) for part in make_partition(labels, partition, balance=True)]
    assert balanced == [100] * 10
    unbalanced = [len(part) for part in make_partition(labels, partition, balance=False)]
    assert len(set(unbalanced)) > 1 and sum(unbalanced) == 1000


def test_unbalanced_iid_keeps_a_floor():
    parts = partition_indices(np.zeros(2000, dtype=np.int64), 20, 1, "iid", False, 1, 0.1,
                              np.random.default_rng(1))
    assert min(len(part) for part in parts) >= 2000 // (10 * 20)


def test_dir_reaches_min_samples_and_alpha_controls_skew(labels):
    def mean_top_class_share(alpha):
        parts = make_partition(labels, "dir", alpha=alpha, min_samples=30)
        assert min(len(part) for part in parts) >= 30
        return np.mean([np.bincount(labels[part]).max() / len(part) for part in parts])

    assert mean_top_class_share(0.1) > 0.5
    assert mean_top_class_share(1000.0) < 0.2  # near uniform: about 1/10 per class


def test_default_min_samples_follows_reference_rule():
    assert default_min_samples(1797, 20) == 40  # batch 10 / (1 - 0.75)
    assert default_min_samples(100, 10) == 5  # half an even share
    assert default_min_samples(10, 20) == 1


@pytest.mark.parametrize("partition,fragment", [
    ("dir", "raise --alpha or lower --num-clients"),
    ("exdir", "raise --alpha or --class-per-client"),
])
def test_impossible_dirichlet_gives_up_quickly(partition, fragment):
    labels = np.repeat(np.arange(NUM_CLASSES), 20)
    start = time.perf_counter()
    with pytest.raises(PartitionError, match=fragment) as caught:
        partition_indices(labels, 50, NUM_CLASSES, partition, False, 2, 0.001, np.random.default_rng(0),
                          min_samples=3)
    assert time.perf_counter() - start < 10
    assert "in 1000 tries" in str(caught.value) and "\n" not in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_min_samples_beyond_the_data_fails_at_once(labels):
    with pytest.raises(PartitionError, match="lower --num-clients"):
        make_partition(labels, "dir", min_samples=101)


@pytest.mark.parametrize("overrides,fragment", [
    ({"num_clients": 0}, "--num-clients must be >= 1"),
    ({"partition": "noniid"}, "--partition"),
    ({"partition": "pat", "class_per_client": 0}, "--class-per-client must be in [1, 10]"),
    ({"partition": "exdir", "class_per_client": 11}, "--class-per-client must be in [1, 10]"),
    ({"partition": "dir", "alpha": 0.0}, "--alpha must be a positive number"),
    ({"partition": "exdir", "alpha": float("nan")}, "--alpha must be a positive number"),
    ({"partition": "exdir", "num_clients": 4, "class_per_client": 2}, "every class has a holder"),
    ({"num_clients": 1001}, "lower --num-clients"),
])
def test_bad_parameters_name_the_option(labels, overrides, fragment):
    arguments = {"partition": "iid", **overrides}
    with pytest.raises(PartitionError) as caught:
        make_partition(labels, **arguments)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_bad_labels_are_rejected():
    rng = np.random.default_rng(0)
    with pytest.raises(PartitionError, match=r"labels must lie in \[0, 10\)"):
        partition_indices(np.array([0, 3, 10]), 2, NUM_CLASSES, "iid", True, 2, 0.1, rng)
    with pytest.raises(PartitionError, match="1-D integer"):
        partition_indices(np.array([0.0, 1.0]), 2, NUM_CLASSES, "iid", True, 2, 0.1, rng)


def test_pat_class_smaller_than_its_holders_fails():
    labels = np.array([0] * 50 + [1])  # class 1 has one sample, dealt to several clients
    with pytest.raises(PartitionError, match="class 1 has 1 samples"):
        partition_indices(labels, 4, 2, "pat", True, 2, 0.1, np.random.default_rng(0))


def test_split_train_test_uses_the_ratio_and_keeps_both_sides():
    parts = [np.arange(0, 4), np.arange(4, 12), np.arange(12, 112)]
    splits = split_train_test(parts, 0.75, np.random.default_rng(0))
    assert [(len(train), len(test)) for train, test in splits] == [(3, 1), (6, 2), (75, 25)]
    for part, (train, test) in zip(parts, splits):
        assert sorted(np.concatenate([train, test]).tolist()) == part.tolist()
    again = split_train_test(parts, 0.75, np.random.default_rng(0))
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(splits, again))
    assert len(split_train_test([np.arange(100)], 0.29, np.random.default_rng(0))[0][0]) == 29


@pytest.mark.parametrize("parts,ratio,fragment", [
    ([np.arange(5), np.arange(5, 6)], 0.75, "client 1 has 1 samples"),
    ([np.arange(5)], 0.1, "0 train / 5 test"),
    ([np.arange(5)], 1.0, "--train-ratio must be in (0, 1)"),
])
def test_split_train_test_errors(parts, ratio, fragment):
    with pytest.raises(DatasetError) as caught:
        split_train_test(parts, ratio, np.random.default_rng(0))
    assert fragment in str(caught.value) and "--" in str(caught.value)
