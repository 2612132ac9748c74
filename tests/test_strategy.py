import random

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

import strategies
from strategies import PartitionSampler
from strategies.validation import reply_problem

SHAPES = {"w": (3, 2), "b": (2,)}


pytestmark = pytest.mark.usefixtures("flower_run_identity")


def _state(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return {k: (rng.normal(size=s) * scale).astype(np.float32) for k, s in SHAPES.items()}


def _reply(partition, state, num_examples=10, node=None):
    request = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node or 1000 + partition, message_type="train")
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in state.items()}),
        "metrics": MetricRecord({"num-examples": num_examples, "partition-id": partition, "loss": 1.0}),
    })
    return Message(content, reply_to=request)


def _aggregate(replies):
    strategy = strategies.build("fedavg")
    global_arrays = ArrayRecord({k: Array(v) for k, v in _state(99).items()})
    strategy._expected = {k: (tuple(v.shape), v.numpy().dtype) for k, v in global_arrays.items()}
    strategy._global = {k: v.numpy() for k, v in global_arrays.items()}
    arrays, _ = strategy.aggregate_train(1, replies)
    return strategy, arrays


def test_valid_reply_passes_and_broken_ones_are_named():
    expected = {k: (s, np.dtype(np.float32)) for k, s in SHAPES.items()}
    assert reply_problem(_reply(0, _state(0)).content, expected) is None
    nan = _state(0)
    nan["w"][0, 0] = np.nan
    assert "non-finite" in reply_problem(_reply(0, nan).content, expected)
    wrong_shape = {**_state(0), "b": np.zeros(3, np.float32)}
    assert "shape" in reply_problem(_reply(0, wrong_shape).content, expected)
    assert "wrong keys" in reply_problem(_reply(0, {"w": _state(0)["w"]}).content, expected)
    assert "num-examples" in reply_problem(_reply(0, _state(0), num_examples=0).content, expected)


def test_aggregation_is_independent_of_arrival_order():
    replies = [_reply(p, _state(p, scale=10.0 ** (p % 4)), num_examples=7 + 13 * p) for p in range(8)]
    _, reference = _aggregate(list(replies))
    for seed in range(3):
        random.Random(seed).shuffle(replies)
        _, shuffled = _aggregate(list(replies))
        for k in SHAPES:
            assert np.array_equal(reference[k].numpy(), shuffled[k].numpy())


def test_bad_update_is_rejected_and_never_averaged():
    good = [_reply(p, _state(p)) for p in range(3)]
    poisoned = _state(3)
    poisoned["w"][:] = np.inf
    strategy, arrays = _aggregate(good + [_reply(3, poisoned)])
    _, clean = _aggregate(good)
    assert strategy.current.clients_rejected == 1 and strategy.current.clients_ok == 3
    assert [c["status"] for c in strategy.current.clients] == ["ok", "ok", "ok", "rejected"]
    for k in SHAPES:
        assert np.isfinite(arrays[k].numpy()).all()
        assert np.array_equal(arrays[k].numpy(), clean[k].numpy())


def test_no_valid_update_keeps_the_previous_model():
    nan = _state(0)
    nan["b"][:] = np.nan
    strategy, arrays = _aggregate([_reply(0, nan)])
    assert arrays is None and strategy.current.clients_rejected == 1


def test_sampler_picks_the_same_partitions_for_the_same_seed():
    mapping = {random.Random(7).getrandbits(63) + i: i for i in range(10)}
    a = PartitionSampler(mapping, fraction=0.3, min_clients=1, seed=5)
    b = PartitionSampler(dict(reversed(list(mapping.items()))), fraction=0.3, min_clients=1, seed=5)
    rounds = [a.sample_partitions(r) for r in range(1, 6)]
    assert rounds == [b.sample_partitions(r) for r in range(1, 6)]
    assert all(len(r) == 3 for r in rounds) and len({tuple(r) for r in rounds}) > 1
    assert [a.partition_of(n) for n in a.sample_nodes(1)] == rounds[0]
    assert PartitionSampler(mapping, fraction=0.05, min_clients=2, seed=0).sample_size() == 2


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="unknown strategy 'fedsgd'"):
        strategies.build("fedsgd")
