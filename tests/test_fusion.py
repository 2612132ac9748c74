import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import data
import models
from clients import training
from clients.local_update import local_update
from clients.task import TrainTask, input_spec
from strategies.fusion import FusionError, fuse, head_targets, neuron_attributions
from strategies.fusion.engine import refine
from strategies.fusion.fitting import closed_form_fit


@pytest.fixture(scope="module")
def mnist():
    ds = data.load("mnist-5k")
    spec = input_spec("simple-cnn", ds)
    return ds, spec


def _train(ds, spec, idx, seed, epochs=2):
    torch.manual_seed(seed)
    model = models.create("simple-cnn", 10)
    loader = data.BatchLoader(ds.train_images[idx], ds.train_labels[idx], spec, 32, shuffle=True, seed=seed)
    training.train(model, loader, epochs, lr=0.02)
    return model.eval(), loader


def _accuracy(model, ds, spec):
    return training.evaluate(model, data.BatchLoader(ds.test_images, ds.test_labels, spec, 500))["accuracy"]


def _proxy(ds, spec, n=256):
    return data.BatchLoader(ds.train_images[-n:], None, spec, 128)


def test_fusing_identical_models_returns_the_same_function(mnist):
    ds, spec = mnist
    model, _ = _train(ds, spec, np.arange(2000), seed=0, epochs=1)
    fused, report = fuse([model, copy.deepcopy(model), copy.deepcopy(model)], _proxy(ds, spec))
    x = next(iter(_proxy(ds, spec)))
    with torch.no_grad():
        assert (fused(x) - model(x)).abs().max().item() < 1e-3
    assert [r["level"] for r in report["levels"]] == ["0-2", "3-5", "6-8", "9-10", "11"]


def test_fusing_with_a_channel_permuted_copy_recovers_the_original(mnist):
    ds, spec = mnist
    original, _ = _train(ds, spec, np.arange(3000), seed=1)
    permuted = copy.deepcopy(original)
    g = torch.Generator().manual_seed(0)
    p = [torch.randperm(n, generator=g) for n in (6, 16, 120, 84)]
    with torch.no_grad():
        a, b = original, permuted
        b[0].weight.copy_(a[0].weight[p[0]]); b[0].bias.copy_(a[0].bias[p[0]])
        b[3].weight.copy_(a[3].weight[p[1]][:, p[0]]); b[3].bias.copy_(a[3].bias[p[1]])
        b[7].weight.copy_(a[7].weight.view(120, 16, 16)[p[2]][:, p[1]].reshape(120, 256)); b[7].bias.copy_(a[7].bias[p[2]])
        b[9].weight.copy_(a[9].weight[p[3]][:, p[2]]); b[9].bias.copy_(a[9].bias[p[3]])
        b[11].weight.copy_(a[11].weight[:, p[3]])
    accuracy = _accuracy(original, ds, spec)
    assert abs(_accuracy(permuted, ds, spec) - accuracy) < 1e-9
    averaged = copy.deepcopy(original)
    averaged.load_state_dict({k: (v + permuted.state_dict()[k]) / 2 for k, v in original.state_dict().items()})
    fused, _ = fuse([original, permuted], _proxy(ds, spec))
    assert _accuracy(averaged, ds, spec) < accuracy - 0.1  # averaging misaligned channels breaks the net
    assert abs(_accuracy(fused, ds, spec) - accuracy) < 0.01


def test_fusion_beats_averaging_for_independently_initialised_models(mnist):
    ds, spec = mnist
    labels = ds.train_labels[:4000]
    shards = [np.flatnonzero(labels < 5), np.flatnonzero(labels >= 5)]
    trained = [_train(ds, spec, idx, seed=10 + i, epochs=3) for i, idx in enumerate(shards)]
    nets = [m for m, _ in trained]
    averaged = copy.deepcopy(nets[0])
    averaged.load_state_dict({k: (v + nets[1].state_dict()[k]) / 2 for k, v in nets[0].state_dict().items()})
    scores = [neuron_attributions(m, loader, "gradxact", max_samples=128) for m, loader in trained]
    fused, report = fuse(nets, _proxy(ds, spec, 512), attributions=scores)
    fused_acc, avg_acc = _accuracy(fused, ds, spec), _accuracy(averaged, ds, spec)
    assert fused_acc > avg_acc + 0.15, (fused_acc, avg_acc)
    assert all(r["loss_after"] <= r["loss_before"] for r in report["levels"])


@pytest.mark.parametrize("layer", [
    nn.Conv2d(3, 5, 3, padding=1),
    nn.Linear(7, 4),
    models.ProjectedConv2d(nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)),
    models.ProjectedConv2d(nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)),
    models.ProjectedLinear(nn.Linear(7, 4)),
], ids=["conv", "linear", "projected-grouped-conv", "projected-depthwise", "projected-linear"])
def test_closed_form_fit_recovers_a_reachable_target(layer):
    torch.manual_seed(0)
    teacher = copy.deepcopy(layer)
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(40, 7) if isinstance(layer, nn.Linear) else torch.randn(40, layer.in_channels, 9, 9)
    with torch.no_grad():
        target = teacher(x)
    assert closed_form_fit(layer, x, target, ridge=1e-9)  # the equations, not the ridge choice
    with torch.no_grad():
        assert (layer(x) - target).abs().max().item() < 1e-3


def test_attribution_gives_one_non_negative_score_per_neuron(mnist):
    ds, spec = mnist
    model, loader = _train(ds, spec, np.arange(500), seed=2, epochs=1)
    for method in ("gradxact", "conductance", "uniform"):
        scores = neuron_attributions(model, loader, method, max_samples=64)
        assert [len(s) for s in scores] == [6, 16, 120, 84, 10]
        assert all((s >= 0).all() and s.sum() > 0 for s in scores)
    grad = neuron_attributions(model, loader, "gradxact", max_samples=64)
    assert grad[2].std() > 0  # not uniform: some neurons matter more


def test_bad_inputs_raise_one_clear_error(mnist):
    ds, spec = mnist
    a, b = models.create("simple-cnn", 10).eval(), models.create("simple-cnn", 10).eval()
    proxy = _proxy(ds, spec, 64)
    with pytest.raises(FusionError, match="model 1 has another architecture"):
        fuse([a, models.create("simple-cnn", 5)], proxy)
    with pytest.raises(FusionError, match="proxy set is empty"):
        fuse([a, b], [])
    bad = copy.deepcopy(b)
    with torch.no_grad():
        bad[3].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(FusionError, match="model 1 has non-finite values in 3.weight"):
        fuse([a, bad], proxy)
    scores = [[torch.ones(w) for w in (6, 16, 120, 84, 10)] for _ in range(2)]
    scores[1][2] = torch.ones(7)
    with pytest.raises(FusionError, match=r"model 1, level 6-8: attribution scores must be 120"):
        fuse([a, b], proxy, attributions=scores)
    with pytest.raises(FusionError, match="unknown head target 'probs': choose log-probs or logits"):
        fuse([a, b], proxy, head_target="probs")


def test_fusion_engine_does_not_import_flwr():
    code = "import strategies.fusion, models, data, sys; print('flwr' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _save_checkpoint(path, model, name="simple-cnn", num_classes=10):
    torch.save({"model": name, "num_classes": num_classes, "state_dict": model.state_dict(), "settings": {}}, path)


def test_fuse_command_writes_a_loadable_model_and_compares_baselines(mnist, tmp_path, capsys):
    from simulations.cli import main

    ds, spec = mnist
    for i in range(2):
        model, _ = _train(ds, spec, np.arange(i * 1500, (i + 1) * 1500), seed=20 + i, epochs=1)
        _save_checkpoint(tmp_path / f"m{i}.pt", model)
    out = tmp_path / "fused.pt"
    code = main(["fuse", str(tmp_path / "m0.pt"), str(tmp_path / "m1.pt"), "--out", str(out),
                 "--dataset", "mnist-5k", "--proxy-size", "256"])
    printed = capsys.readouterr().out
    assert code == 0 and "weight average" in printed and "output ensemble" in printed and "fusion" in printed
    saved = torch.load(out, weights_only=False)
    fused = models.create("simple-cnn", 10)
    fused.load_state_dict(saved["state_dict"])
    assert len(saved["fusion_report"]["levels"]) == 5
    assert _accuracy(fused.eval(), ds, spec) > 0.5


def test_fuse_command_refuses_bad_checkpoints(tmp_path, capsys):
    from simulations.cli import main

    _save_checkpoint(tmp_path / "a.pt", models.create("simple-cnn", 10))
    _save_checkpoint(tmp_path / "b.pt", models.create("simple-cnn", 5), num_classes=10)
    (tmp_path / "c.pt").write_bytes(b"not a checkpoint")
    cases = [
        ([str(tmp_path / "missing.pt")], "does not exist"),
        ([str(tmp_path / "a.pt"), str(tmp_path / "b.pt")], "b.pt does not fit simple-cnn"),
        ([str(tmp_path / "a.pt"), str(tmp_path / "c.pt")], "c.pt is unreadable"),
    ]
    for paths, message in cases:
        assert main(["fuse", *paths, "--out", str(tmp_path / "x.pt"), "--dataset", "mnist-5k"]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_fits_that_do_not_help_are_reverted():
    """Never worse than it was: fusing copies of one model, the averaged hidden levels
    already hit their targets (loss 0), so every fit there is reverted and their
    weights come back bit for bit."""
    torch.manual_seed(0)
    model = models.create("simple-cnn", 10, pretrained=False).eval()
    copies = [model, copy.deepcopy(model), copy.deepcopy(model)]
    fused, report = fuse(copies, [torch.randn(64, 1, 28, 28)], restarts=False)
    hidden, head = report["levels"][:-1], report["levels"][-1]
    assert all(r["fit"] == "closed (reverted)" and r["loss_before"] == r["loss_after"] == 0 for r in hidden)
    assert head["loss_after"] <= head["loss_before"] < 1e-12
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in fused.state_dict().items() if not k.startswith("11."))


def test_the_log_probs_target_lets_a_class_expert_outvote_an_unsure_model_of_larger_logit_scale():
    # Model 0 saw classes 0-1 and is unsure between them with large logits; model 1 saw
    # only class 2 and claims the sample with small ones. Each class is judged by its own
    # model (the class weights): in log-probabilities class 2 wins, in centred logits the
    # larger scale of model 0 carries class 0.
    logits = [torch.tensor([[10.0, 9.9, 0.0]]), torch.tensor([[0.0, 0.0, 2.0]])]
    counts = torch.tensor([[50.0, 50.0, 0.0], [0.0, 0.0, 50.0]])
    assert head_targets(logits, counts, "log-probs").argmax(1).item() == 2
    assert head_targets(logits, counts, "logits").argmax(1).item() == 0
    # Identical models give back their own logits under either target.
    same = [torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, 0.0]])] * 3
    for kind in ("log-probs", "logits"):
        assert torch.allclose(head_targets(same, None, kind), same[0], atol=1e-6)


def test_refinement_learns_the_teachers_classes_on_mixes_of_the_proxy_inputs():
    torch.manual_seed(0)
    teacher_net, student = nn.Linear(4, 3), nn.Linear(4, 3)
    x, test = torch.randn(40, 4), torch.randn(500, 4)
    asked = []

    def teacher(inputs):
        asked.append(inputs)
        return teacher_net(inputs)

    def agreement():
        with torch.no_grad():
            return float((student(test).argmax(1) == teacher_net(test).argmax(1)).float().mean())

    before = agreement()
    report = refine(student, x, teacher, steps=2000, seed=0)
    assert 0 < report["best_step"] <= report["steps"] <= 2000 and report["loss_best"] < 0.5 * report["loss_start"]
    assert before < 0.6 and agreement() > 0.8
    # After the held-out fifth, the teacher is asked once about 8 mixes of each other proxy row.
    assert [len(a) for a in asked] == [8, 8 * 32]
    nearest = torch.cdist(asked[1], x).min(1).values
    assert (nearest > 1e-3).float().mean() > 0.9


def _first_round(attribution: str = "", local_epochs: int = 3) -> dict:
    """Eight mnist-5k clients' first round at Dirichlet 0.3: their models, attribution
    scores (with `attribution`) and class counts, the proxy and the test images."""
    spec = data.FederationSpec(dataset="mnist-5k", clients=8, alpha=0.3, proxy_size=500, seed=0)
    task = TrainTask(federation=spec, attribution=attribution, share_class_counts=True, server_round=1, lr=0.05,
                     local_epochs=local_epochs)
    federation = data.build_federation(spec)
    template = task.build_model(10)
    inputs = task.input_spec(federation.data)
    updates = [local_update(task, p, models.exchanged_state(template)) for p in range(spec.clients)]
    return {
        "nets": [models.with_state(template, u.state).eval() for u in updates],
        "scores": [[torch.as_tensor(u.attributions[level.name]) for level in models.levels(template)]
                   for u in updates] if attribution else None,
        "counts": torch.tensor([u.class_counts for u in updates], dtype=torch.float64),
        "proxy": torch.cat(list(data.BatchLoader(federation.proxy_images(), None, inputs, 256))),
        "test": torch.cat(list(data.BatchLoader(federation.data.test_images, None, inputs, 500))),
    }


def test_refinement_brings_the_fused_model_closer_to_its_target():
    # The level-by-level fit agrees with its target on 88% of test images.
    clients = _first_round()
    nets, counts, proxy, test = clients["nets"], clients["counts"], clients["proxy"], clients["test"]
    fitted, report = fuse(nets, [proxy], class_weights=counts, restarts=False)
    assert report["refine"] is None
    refined, report = fuse(nets, [proxy], class_weights=counts, restarts=False, refine_steps=1000)
    refine = report["refine"]
    assert refine["best_step"] > 0 and refine["loss_best"] < refine["loss_start"]
    with torch.no_grad():
        target = head_targets([m(test) for m in nets], counts).argmax(1)
        agreement = {name: float((m(test).argmax(1) == target).double().mean())
                     for name, m in (("fitted", fitted), ("refined", refined))}
    # The held-out proxy samples' gain carries to images neither saw.
    assert agreement["refined"] > agreement["fitted"] + 0.01, agreement


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fusion_on_the_gpu_matches_the_cpu():
    # Fused with attributions, class weights and the refinement, once on each device.
    clients = _first_round("gradxact", local_epochs=2)
    fused = {}
    for device in ("cpu", "cuda"):
        fused[device], report = fuse(clients["nets"], [clients["proxy"]], clients["scores"],
                                     class_weights=clients["counts"], restarts=False, refine_steps=300, device=device)
        assert next(fused[device].parameters()).device.type == "cpu"
        fused[device + " fits"] = [level["fit"] for level in report["levels"]]
    # The clients' models stay where they were.
    assert all(next(m.parameters()).device.type == "cpu" for m in clients["nets"])
    assert fused["cpu fits"] == fused["cuda fits"]
    with torch.no_grad():
        test = clients["test"]
        agreement = float((fused["cpu"](test).argmax(1) == fused["cuda"](test).argmax(1)).double().mean())
    assert agreement > 0.98, agreement
