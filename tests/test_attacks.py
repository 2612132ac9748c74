"""Byzantine clients: attacked replies that pass validation, and Flower's robust rules."""

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

import data
import models
import strategies
from clients import attacks
from clients.local_update import local_update
from clients.task import TrainTask
from server.results import read_jsonl
from server.settings import RunSettings, SettingsError
from simulations.simulate import simulate
from strategies.fusion.claims import capped_sizes, checked_class_counts
from strategies.messages import array_record
from strategies.recording import OUTLIER_FACTOR
from strategies.validation import reply_problem

pytestmark = pytest.mark.usefixtures("flower_run_identity")
SPEC = data.FederationSpec(dataset="mnist-5k", clients=4, proxy_size=100, seed=0)


@pytest.fixture(scope="module")
def honest():
    """Client 0's honest update after one local epoch (with fusion's records), the
    global model it started from, and the task."""
    task = TrainTask(federation=SPEC, attribution="gradxact", share_class_counts=True, server_round=1, lr=0.05)
    template = task.build_model(10)
    start = models.exchanged_state(template)
    return task, start, local_update(task, 0, start), template


def _content(update) -> RecordDict:
    content = RecordDict({"arrays": array_record(update.state), "metrics": MetricRecord(update.metrics),
                          "attributions": array_record(update.attributions),
                          "class-counts": MetricRecord({"counts": update.class_counts})})
    return content


def _delta(update, start) -> dict:
    return {k: update.state[k].astype(np.float64) - start[k] for k in start}


def _norm(arrays) -> float:
    return float(np.sqrt(sum((v ** 2).sum() for v in arrays.values())))


@pytest.mark.parametrize("kind", attacks.ATTACK_KINDS)
def test_every_attacked_reply_passes_validation(honest, kind):
    task, start, update, template = honest
    if kind == "label-flip":
        attacker = TrainTask(**{**task.__dict__, "attackers": SPEC.clients, "attack": kind})
        attacked = local_update(attacker, 0, start)
    else:
        attacked = attacks.attack_update(update, start, kind, seed=0, server_round=1, partition_id=0)
    expected = {k: (v.shape, v.dtype) for k, v in start.items()}
    widths = {level.name: level.width for level in models.levels(template)}
    assert reply_problem(_content(attacked), expected, attribution_widths=widths, num_classes=10) is None
    # The norm bound the server applies after validation: an attack stays within an honest update's size.
    assert _norm(_delta(attacked, start)) <= 1.01 * _norm(_delta(update, start)) + 1e-9 or kind == "label-flip"
    assert _norm(_delta(attacked, start)) < OUTLIER_FACTOR * max(_norm(start), 1.0)
    honest_delta, attacked_delta = _delta(update, start), _delta(attacked, start)
    if kind == "sign-flip":
        assert all(np.allclose(attacked_delta[k], -honest_delta[k], atol=1e-6) for k in start)
    elif kind == "noise":
        assert _norm(attacked_delta) == pytest.approx(_norm(honest_delta), rel=1e-4)
        cosine = sum((attacked_delta[k] * honest_delta[k]).sum() for k in start) / _norm(honest_delta) ** 2
        assert abs(cosine) < 0.05  # a random direction
    elif kind == "lie-counts":
        counts = np.array(update.class_counts)
        assert attacked.class_counts == [sum(counts) if c == int(np.argmin(counts)) else 0 for c in range(10)]
    elif kind == "lie-size":
        assert attacked.metrics["num-examples"] == attacks.SIZE_FACTOR * update.metrics["num-examples"]
        assert attacked.class_counts == [attacks.SIZE_FACTOR * c for c in update.class_counts]
    elif kind == "label-flip":
        assert attacked.class_counts == update.class_counts[::-1]


def test_attackers_are_the_same_partitions_all_run_and_the_others_are_honest(honest):
    task, start, update, _ = honest
    assert attacks.attacking_partitions(2, 10, seed=1) == attacks.attacking_partitions(2, 10, seed=1)
    assert len(attacks.attacking_partitions(2, 10, seed=1)) == 2
    flipper = TrainTask(**{**task.__dict__, "attackers": 1, "attack": "label-flip"})
    chosen = attacks.attacking_partitions(1, SPEC.clients, SPEC.seed)
    honest_one = next(p for p in range(SPEC.clients) if p not in chosen)
    assert attacks.is_attacker(flipper, chosen.pop()) and not attacks.is_attacker(flipper, honest_one)
    labels = np.array([0, 3, 9])
    assert attacks.training_labels(flipper, honest_one, labels, 10).tolist() == [0, 3, 9]


def _message(partition: int, state: dict, examples: int = 100) -> Message:
    request = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=1000 + partition, message_type="train")
    content = RecordDict({"arrays": array_record(state),
                          "metrics": MetricRecord({"num-examples": examples, "partition-id": partition,
                                                          "loss": 0.5})})
    return Message(content, reply_to=request)


def _aggregate(name: str, states: list[dict], start: dict, examples: list[int] | None = None, **options) -> dict:
    strategy = strategies.build(name, **options)
    strategy._expected = {k: (v.shape, v.dtype) for k, v in start.items()}
    strategy._global = start
    examples = examples or [100] * len(states)
    arrays, _ = strategy.aggregate_train(1, [_message(p, s, n) for p, (s, n) in enumerate(zip(states, examples))])
    assert strategy.current.clients_ok == len(states)
    return {k: v.numpy() for k, v in arrays.items()}


def test_krum_with_no_malicious_client_on_identical_updates_returns_that_update(honest):
    _, start, update, _ = honest
    merged = _aggregate("krum", [update.state] * 4, start)
    assert all(np.array_equal(merged[k], update.state[k]) and merged[k].dtype == update.state[k].dtype
               for k in start)


@pytest.mark.parametrize("name, options", [("krum", {"malicious_clients": 1}), ("fedmedian", {}),
                                           ("fedtrimmedavg", {"trim_beta": 0.4})])
def test_robust_rules_ignore_two_sign_flipped_updates_of_five_where_fedavg_does_not(honest, name, options):
    # Trimming 2 of 5 values at each end (beta 0.4) leaves the median; beta 0.2 keeps one flipped value.
    _, start, update, _ = honest
    flipped = attacks.attack_update(update, start, "sign-flip", seed=0, server_round=1, partition_id=0).state
    states = [update.state] * 3 + [flipped] * 2
    robust = _aggregate(name, states, start, **options)
    averaged = _aggregate("fedavg", states, start)
    gap = {k: np.abs(robust[k] - update.state[k]).max() for k in start}
    assert max(gap.values()) < 1e-6, gap
    # FedAvg moves a fifth of the honest step back: 3/5 - 2/5 of it is left.
    assert max(np.abs(averaged[k] - update.state[k]).max() for k in start) > 1e-3


@pytest.mark.parametrize("name", ["krum", "fedmedian", "fedtrimmedavg"])
def test_robust_rules_ignore_claimed_sizes_so_lie_size_cannot_reach_them(honest, name):
    # Why the Byzantine grid runs lie-size against FedAvg and fusion only.
    _, start, update, _ = honest
    states = [{k: (start[k] + (p + 1) / 5 * (update.state[k] - start[k])).astype(start[k].dtype) for k in start}
              for p in range(5)]
    truthful = _aggregate(name, states, start, examples=[100] * 5)
    lying = _aggregate(name, states, start, examples=[100 * attacks.SIZE_FACTOR] * 2 + [100] * 3)
    assert all(np.array_equal(truthful[k], lying[k]) for k in start)
    fedavg = (_aggregate("fedavg", states, start, examples=[100] * 5),
              _aggregate("fedavg", states, start, examples=[100 * attacks.SIZE_FACTOR] * 2 + [100] * 3))
    assert max(np.abs(fedavg[0][k] - fedavg[1][k]).max() for k in start) > 1e-4


def test_lie_counts_leaves_a_client_that_sends_no_histogram_honest(honest):
    # Only fusion's clients send class histograms: the Byzantine grid runs lie-counts against fusion only.
    _, start, update, _ = honest
    silent = type(update)(update.state, update.metrics, update.attributions, None)
    attacked = attacks.attack_update(silent, start, "lie-counts", seed=0, server_round=1, partition_id=0)
    assert attacked.class_counts is None and attacked.metrics == update.metrics
    assert all(np.array_equal(attacked.state[k], update.state[k]) for k in start)
    lying = attacks.attack_update(update, start, "lie-counts", seed=0, server_round=1, partition_id=0)
    assert lying.class_counts != update.class_counts


def test_bad_attack_settings_are_refused_before_any_run():
    with pytest.raises(SettingsError, match="--attackers must be a whole number from 0 to --clients"):
        RunSettings.from_mapping({"dataset": "mnist-5k", "clients": 4, "attackers": 5}).validate()
    with pytest.raises(SettingsError, match="--attack must be one of"):
        RunSettings.from_mapping({"attack": "bribe"}).validate()
    with pytest.raises(SettingsError, match="Krum needs more than 2 x 2 \\+ 2 clients"):
        RunSettings.from_mapping({"dataset": "mnist-5k", "clients": 6, "strategy": "krum",
                                  "malicious_clients": 2}).validate()
    with pytest.raises(SettingsError, match="leaves no client to train"):
        RunSettings.from_mapping({"dataset": "mnist-5k", "clients": 4, "attackers": 4, "attack": "absent"}).validate()


def _attacked_federation(out, attack: str) -> RunSettings:
    """Two rounds of FedAvg on 4 clients, one of them attacking, run into `out`."""
    settings = RunSettings.from_mapping({
        "dataset": "mnist-5k", "clients": 4, "proxy_size": 100, "seed": 3, "rounds": 2, "lr": 0.05,
        "batch_size": 32, "ray_num_cpus": 2, "attackers": 1, "attack": attack, "out": str(out)})
    settings.validate()
    simulate(settings, show_progress=False)
    return settings


def test_a_federation_records_its_attackers_and_their_replies_are_taken(tmp_path):
    _attacked_federation(tmp_path / "run", "sign-flip")
    lines = read_jsonl(tmp_path / "run" / "clients.jsonl")
    attacked = [line for line in lines if line.get("injected") == "attack:sign-flip"]
    # One partition, both rounds, accepted: well-formed, so only a robust rule can stop it.
    assert len(attacked) == 2 and len({line["partition"] for line in attacked}) == 1
    assert all(line["status"] == "ok" for line in attacked)


def test_absent_attackers_fail_every_reply_so_the_others_train_alone(tmp_path):
    # The reference for the attacks: what a defence that caught every attacker would leave.
    settings = _attacked_federation(tmp_path / "run", "absent")
    absent = attacks.attacking_partitions(1, 4, seed=3)
    lines = read_jsonl(tmp_path / "run" / "clients.jsonl")
    assert {line["partition"] for line in lines if line["status"] == "failed"} == absent
    assert all("absent attackers" in line["reason"] for line in lines if line["status"] == "failed")
    assert sorted(line["round"] for line in lines if line["status"] == "ok") == [1, 1, 1, 2, 2, 2]
    rounds = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [(r["clients_ok"], r["clients_failed"]) for r in rounds] == [(3, 1), (3, 1)]
    # Only `absent` fails a client: the attacks reply.
    task = settings.train_task()
    attacks.fail_if_absent(TrainTask(**{**task.__dict__, "attack": "sign-flip"}), next(iter(absent)))
    attacks.fail_if_absent(task, next(p for p in range(4) if p not in absent))


def test_a_lie_counts_claim_cannot_move_the_head_class_weights_past_the_cap():
    predicted = torch.tensor([[0.55, 0.3, 0.1, 0.05], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]],
                             dtype=torch.float64)
    honest = torch.tensor([[60.0, 30.0, 10.0, 0.0], [25.0, 25.0, 25.0, 25.0], [100.0, 0.0, 0.0, 0.0]])
    kept = checked_class_counts(honest, predicted, cap=2)
    # Honest claims lie within 2x their models' predicted shares, even all-in-one-class ones.
    assert kept.replaced == [] and kept.capped_mass[2] == pytest.approx(0.0)
    assert torch.equal(kept.counts, honest.double())
    lying = honest.clone()
    lying[0] = torch.tensor([0.0, 0.0, 0.0, 100.0])  # everything claimed for its rarest class
    lying[1] = torch.tensor([70.0, 10.0, 10.0, 10.0])  # 0.7 of class 0 against 2 x 0.25: 0.2 over
    checked = checked_class_counts(lying, predicted, cap=2)
    assert checked.replaced == [0, 1]
    assert checked.capped_mass[0] == pytest.approx(0.9) and checked.capped_mass[1] == pytest.approx(0.2)
    # The liars keep their size; their models' predictions stand in for their claims.
    assert torch.allclose(checked.counts[:2], 100 * predicted[:2])
    shares = checked.counts / checked.counts.sum(1, keepdim=True)
    assert bool((shares <= 2 * predicted + 1e-12).all())
    # Within the tolerance a claim is capped, not replaced.
    over = honest.clone()
    over[1] = torch.tensor([55.0, 15.0, 15.0, 15.0])
    capped = checked_class_counts(over, predicted, cap=2)
    assert capped.replaced == [] and torch.allclose(capped.counts[1], torch.tensor([50.0, 15.0, 15.0, 15.0],
                                                                                  dtype=torch.float64))
    with pytest.raises(ValueError, match="claim cap must be >= 1"):
        checked_class_counts(honest, predicted, cap=0.5)


def test_a_lie_size_claim_is_capped_at_a_multiple_of_the_median_claim():
    # Median 2500: a 10x claim of 30000 counts as 4 x 2500; honest spreads pass untouched.
    assert capped_sizes([1000, 2000, 3000, 30000], cap=4) == [1000.0, 2000.0, 3000.0, 10000.0]
    assert capped_sizes([938, 3975, 12707, 5347], cap=4) == [938.0, 3975.0, 12707.0, 5347.0]
    with pytest.raises(ValueError, match="size cap must be >= 1"):
        capped_sizes([1, 2], cap=0.5)
