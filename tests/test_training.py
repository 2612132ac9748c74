import copy

import numpy as np
import torch

import data
import models
from clients import training
from clients.local_update import local_update
from clients.task import TrainTask, input_spec
from data import BatchLoader


def _loader(n=1200, seed=0):
    ds = data.load("synthetic")
    spec = input_spec("simple-cnn", ds)
    return BatchLoader(ds.train_images[:n], ds.train_labels[:n], spec, batch_size=32, shuffle=True, seed=seed), \
        BatchLoader(ds.test_images, ds.test_labels, spec, batch_size=200)


def test_local_training_learns_the_synthetic_classes():
    train_loader, test_loader = _loader()
    torch.manual_seed(0)
    model = models.create("simple-cnn", 10)
    before = training.evaluate(model, test_loader)
    stats = training.train(model, train_loader, epochs=2, lr=0.05)
    after = training.evaluate(model, test_loader)
    assert stats["steps"] == 2 * len(train_loader)
    assert after["accuracy"] > before["accuracy"] + 0.3 and after["loss"] < before["loss"]


def test_fedprox_term_keeps_local_weights_closer_to_the_global_ones():
    torch.manual_seed(0)
    start = models.create("simple-cnn", 10)

    def drift(mu):
        model = copy.deepcopy(start)
        train_loader, _ = _loader(seed=1)
        training.train(model, train_loader, epochs=2, lr=0.05, proximal_mu=mu)
        return sum(((p - q) ** 2).sum().item() for p, q in zip(model.parameters(), start.parameters()))

    assert drift(1.0) < 0.5 * drift(0.0)


def test_frozen_norm_stats_keep_the_running_statistics_while_the_affine_weights_train():
    train_loader, _ = _loader(n=256)
    torch.manual_seed(0)
    start = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 10))

    def trained(norm_stats):
        model = copy.deepcopy(start)
        training.train(model, train_loader, epochs=1, lr=0.05, norm_stats=norm_stats)
        return model[1]

    frozen, batch = trained("frozen"), trained("batch")
    assert torch.equal(frozen.running_mean, start[1].running_mean) and torch.equal(frozen.running_var, start[1].running_var)
    assert frozen.num_batches_tracked.item() == 0 and not torch.equal(frozen.weight, start[1].weight)
    assert (batch.running_mean - start[1].running_mean).abs().max() > 1e-3 and batch.num_batches_tracked.item() == 8


def test_pretrained_backbones_freeze_their_norm_statistics_unless_told_otherwise():
    from server.settings import RunSettings

    assert RunSettings.from_mapping({"model": "efficientnet-lite0"}).task.norm_stats == "frozen"
    assert RunSettings.from_mapping({"model": "efficientnet-lite0", "pretrained": False}).task.norm_stats == "batch"
    assert RunSettings.from_mapping({"model": "simple-cnn"}).task.norm_stats == "batch"
    assert RunSettings.from_mapping({"model": "efficientnet-lite0", "norm-stats": "batch"}).task.norm_stats == "batch"


def test_train_task_round_trips_through_a_flat_config():
    task = TrainTask(federation=data.FederationSpec(dataset="digits", alpha=0.1, clients=7), lr=0.2, local_epochs=3)
    config = task.to_config()
    assert config["classes-per-client"] == 2 and config["local-epochs"] == 3
    assert all(isinstance(v, (int, float, str, bool)) for v in config.values())
    config["proximal-mu"] = 0.5  # what flwr's FedProx adds
    parsed = TrainTask.from_config(config)
    assert parsed.federation == task.federation and parsed.lr == 0.2 and parsed.proximal_mu == 0.5


def test_exchanged_state_round_trips_and_refuses_a_wrong_shape():
    a, b = models.create("simple-cnn", 10), models.create("simple-cnn", 10)
    state = models.exchanged_state(a)
    models.load_exchanged_state(b, state)
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(a(x), b(x))
    state["0.weight"] = np.zeros((1, 1))
    try:
        models.load_exchanged_state(b, state)
    except ValueError as err:
        assert "0.weight" in str(err)
    else:
        raise AssertionError("wrong shape accepted")


def test_the_initial_model_is_the_same_on_server_and_every_client():
    """Frozen tensors never travel, so a randomly initialised projected model must be
    built identically everywhere from the run's seed."""
    task = TrainTask(federation=data.FederationSpec(seed=3), model="simple-cnn", projection=True)
    torch.manual_seed(123)  # whatever the process did before
    a = task.build_model(10).state_dict()
    torch.manual_seed(456)
    b = task.build_model(10).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = TrainTask(federation=data.FederationSpec(seed=4), model="simple-cnn").build_model(10).state_dict()
    assert not torch.equal(other["0.weight"], a["0.weight"])


def test_local_steps_take_exactly_that_many_steps_whatever_the_shard():
    short, _ = _loader(n=100)  # 4 batches of 32: 10 steps pass over it three times
    long, _ = _loader(n=1200)  # 38 batches: 10 steps stop inside the first pass
    for loader in (short, long):
        model = models.create("simple-cnn", 10)
        assert training.train(model, loader, epochs=5, lr=0.05, steps=10)["steps"] == 10
    assert training.train(models.create("simple-cnn", 10), short, epochs=2, lr=0.05)["steps"] == 2 * len(short)


def test_clients_of_unequal_shards_take_the_same_local_steps():
    spec = data.FederationSpec(dataset="mnist-5k", clients=4, partition="dirichlet", alpha=0.1, proxy_size=100, seed=0)
    task = TrainTask.from_config(TrainTask(federation=spec, local_steps=7, server_round=1).to_config())
    assert task.local_steps == 7  # travels in the train message
    start = models.exchanged_state(task.build_model(10))
    updates = [local_update(task, p, start) for p in range(spec.clients)]
    sizes = [u.metrics["num-examples"] for u in updates]
    assert max(sizes) > 2 * min(sizes)  # the shards differ, the steps do not
    assert [u.metrics["steps"] for u in updates] == [7] * spec.clients
