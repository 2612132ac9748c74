import numpy as np
import pytest

import data
from data import FederationSpec, build_federation, label_skew, partition


@pytest.fixture(scope="module")
def labels():
    return data.load("digits").train_labels


@pytest.mark.parametrize("scheme,kwargs", [
    ("iid", {}), ("dirichlet", {"alpha": 0.3}), ("pathological", {"classes_per_client": 2}),
])
def test_partitions_are_disjoint_and_cover_the_data(labels, scheme, kwargs):
    shards = partition(labels, scheme, 8, seed=3, **kwargs)
    assert len(shards) == 8
    joined = np.concatenate(shards)
    assert len(joined) == len(np.unique(joined)), "a sample is in two shards"
    if scheme != "pathological":  # pathological may drop classes nobody was assigned
        assert np.array_equal(np.sort(joined), np.arange(len(labels)))
    assert all(len(s) > 0 for s in shards)


@pytest.mark.parametrize("scheme,kwargs", [
    ("iid", {}), ("dirichlet", {"alpha": 0.3}), ("pathological", {"classes_per_client": 3}),
])
def test_same_seed_gives_same_partition_and_another_seed_differs(labels, scheme, kwargs):
    a = partition(labels, scheme, 6, seed=11, **kwargs)
    b = partition(labels, scheme, 6, seed=11, **kwargs)
    c = partition(labels, scheme, 6, seed=12, **kwargs)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_lower_alpha_gives_higher_label_skew(labels):
    def skew(alpha):
        return np.mean([
            label_skew(data.class_histogram(labels, partition(labels, "dirichlet", 10, alpha=alpha, seed=s), 10))
            for s in range(3)
        ])

    skews = [skew(a) for a in (0.1, 0.5, 5.0, 100.0)]
    assert skews == sorted(skews, reverse=True), skews
    assert skews[0] > 0.5 and skews[-1] < 0.1


def test_iid_partition_has_almost_no_label_skew(labels):
    hist = data.class_histogram(labels, partition(labels, "iid", 5, seed=0), 10)
    assert label_skew(hist) < 0.08


def test_pathological_gives_each_client_its_number_of_classes(labels):
    shards = partition(labels, "pathological", 10, classes_per_client=2, seed=0)
    hist = data.class_histogram(labels, shards, 10)
    assert ((hist > 0).sum(1) == 2).all()
    assert ((hist > 0).sum(0) > 0).all(), "every class is held by some client"


def test_proxy_set_is_disjoint_from_client_shards_and_stratified():
    fed = build_federation(FederationSpec(dataset="digits", clients=5, proxy_size=200, seed=4))
    shards = np.concatenate(fed.client_indices)
    assert len(fed.proxy_indices) == 200
    assert np.intersect1d(fed.proxy_indices, shards).size == 0
    assert len(shards) + 200 == len(fed.data.train_labels)
    proxy_counts = np.bincount(fed.data.train_labels[fed.proxy_indices], minlength=10)
    assert proxy_counts.min() >= 17 and proxy_counts.max() <= 23


def test_bad_partition_settings_are_refused(labels):
    with pytest.raises(data.PartitionError, match="alpha"):
        partition(labels, "dirichlet", 4, alpha=0.0)
    with pytest.raises(data.PartitionError, match="classes-per-client"):
        partition(labels, "pathological", 4, classes_per_client=11)
    with pytest.raises(data.PartitionError, match="more than"):
        partition(labels[:5], "iid", 6)
    with pytest.raises(data.PartitionError, match="unknown partition"):
        partition(labels, "zipf", 4)
