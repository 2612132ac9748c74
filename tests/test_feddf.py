"""FedDF's distillation on tiny real data: the clients' ensemble distilled into their
average beats the average, and a distillation that cannot help gives the average back."""

import numpy as np
import pytest
import torch

import data
import models
from clients import training
from server.settings import RunSettings
from simulations.inprocess import fedavg_rounds
from strategies.distillation import distill, ensemble_logits, split_proxy
from strategies.fusion import average_models


@pytest.fixture(scope="module")
def drifted_clients():
    """One round of 4 clients, 5 local epochs each on Dirichlet 0.1 shards of mnist-5k:
    their models drift apart, so their average is poor and their ensemble is not."""
    settings = RunSettings.from_mapping({"dataset": "mnist-5k", "partition": "dirichlet", "alpha": 0.1, "clients": 4,
                                         "proxy_size": 500, "seed": 1, "local_epochs": 5, "lr": 0.05})
    settings.validate()
    task = settings.train_task()
    federation = data.build_federation(task.federation)
    template = task.build_model(federation.num_classes)
    spec = task.input_spec(federation.data)
    round_one = next(fedavg_rounds(task, models.exchanged_state(template), 1))
    client_models = [models.with_state(template, u.state) for u in round_one.updates]
    average = average_models(client_models, [u.metrics["num-examples"] for u in round_one.updates])
    proxy = torch.cat(list(data.BatchLoader(federation.proxy_images(), None, spec, 256)))
    test = data.BatchLoader(federation.data.test_images, federation.data.test_labels, spec, 250)
    return client_models, average, proxy, test


def test_distilling_the_ensemble_beats_the_average_it_starts_from(drifted_clients):
    client_models, average, proxy, test = drifted_clients
    x_fit, x_held = split_proxy(proxy, seed=0)
    distilled, report = distill(average, x_fit, ensemble_logits(client_models, x_fit), x_held,
                                ensemble_logits(client_models, x_held), steps=1500, seed=0)
    before, after = training.evaluate(average, test)["accuracy"], training.evaluate(distilled, test)["accuracy"]
    assert report.best_step > 0 and report.agreement_best > report.agreement_start
    assert after > before + 0.05, (before, after)


def test_a_distillation_that_cannot_improve_keeps_the_average(drifted_clients):
    client_models, average, proxy, _ = drifted_clients
    x_fit, x_held = split_proxy(proxy, seed=0)
    # The teacher is the student itself: it agrees everywhere at step 0 with zero KL, and
    # a learning rate this large only moves it away.
    distilled, report = distill(average, x_fit, ensemble_logits([average], x_fit), x_held,
                                ensemble_logits([average], x_held), steps=300, lr=1.0, eval_every=100, patience=1000)
    assert report.best_step == 0 and report.steps == 300
    assert all(torch.equal(a, b) for a, b in zip(distilled.state_dict().values(), average.state_dict().values()))


def test_the_proxy_split_is_seeded_and_disjoint():
    proxy = torch.arange(50.0)[:, None]
    fit, held = split_proxy(proxy, seed=3)
    again, _ = split_proxy(proxy, seed=3)
    assert len(held) == 10 and torch.equal(fit, again)
    assert not np.intersect1d(fit.numpy(), held.numpy()).size


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_distillation_on_the_gpu_matches_the_cpu(drifted_clients):
    client_models, average, proxy, test = drifted_clients
    x_fit, x_held = split_proxy(proxy, seed=0)
    teacher_fit, teacher_held = ensemble_logits(client_models, x_fit), ensemble_logits(client_models, x_held)
    runs = {device: distill(average, x_fit, teacher_fit, x_held, teacher_held, steps=500, eval_every=100, seed=0,
                            device=device) for device in ("cpu", "cuda")}
    assert all(next(model.parameters()).device.type == "cpu" for model, _ in runs.values())
    accuracy = {device: training.evaluate(model, test)["accuracy"] for device, (model, _) in runs.items()}
    assert abs(accuracy["cpu"] - accuracy["cuda"]) < 0.01, accuracy
    assert abs(runs["cpu"][1].agreement_best - runs["cuda"][1].agreement_best) < 0.02
