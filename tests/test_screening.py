"""Fusion's screen of well-formed but hostile models, on tiny real networks trained on
Gaussian blobs (4 classes, 12 dimensions)."""

import copy

import pytest
import torch
from torch import nn

from strategies.fusion.claims import predicted_shares, proxy_probabilities
from strategies.fusion.screening import (MIN_MEDIAN_AGREEMENT, claim_agreements, claim_alignments, ensemble_agreements,
                                         screen)

CLASSES, DIM = 4, 12


def _blobs(n: int, classes: list[int], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    centres = torch.eye(CLASSES, DIM) * 3
    labels = torch.tensor(classes)[torch.randint(len(classes), (n,), generator=generator)]
    return centres[labels] + torch.randn(n, DIM, generator=generator), labels


def _trained(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 30) -> nn.Module:
    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model


def _sign_flipped(model: nn.Module, start: nn.Module) -> nn.Module:
    """start - (model - start): the honest update reversed, as clients.attacks sends it."""
    flipped = copy.deepcopy(model)
    with torch.no_grad():
        for f, m, s in zip(flipped.parameters(), model.parameters(), start.parameters()):
            f.copy_(2 * s - m)
    return flipped


def _label_flipped(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    return _trained(model, x, CLASSES - 1 - y)


@pytest.fixture(scope="module")
def federation():
    """A start model trained briefly on every class, and six clients that each trained from
    it on a shard of three classes (non-IID), with their class histograms."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    start = _trained(nn.Sequential(nn.Linear(DIM, 16), nn.ReLU(), nn.Linear(16, CLASSES)),
                     *_blobs(400, list(range(CLASSES)), generator), steps=5)
    shards = [_blobs(200, [c, (c + 1) % CLASSES, (c + 2) % CLASSES], generator) for c in (0, 1, 2, 3, 0, 2)]
    clients = [_trained(start, x, y) for x, y in shards]
    counts = torch.stack([torch.bincount(y, minlength=CLASSES) for _, y in shards]).double()
    proxy, _ = _blobs(400, list(range(CLASSES)), generator)
    return start, shards, clients, counts, proxy


def test_honest_clients_pass_and_a_label_flipped_model_is_screened(federation):
    start, shards, clients, counts, proxy = federation
    honest = screen(clients, proxy, start, counts)
    assert honest.screened == [] and min(honest.alignment) > 0
    flipped = _label_flipped(start, *shards[3])
    flipped_counts = counts.clone()
    flipped_counts[3] = counts[3].flip(0)  # it reports the labels it trained on
    result = screen(clients[:3] + [flipped] + clients[4:], proxy, start, flipped_counts)
    assert result.screened == [3]
    assert result.agreement[3] < 0.5 * sorted(result.agreement)[3]
    # It disagrees most where it claims to know: on the samples the others assign to the
    # classes it claims, it predicts other classes.
    assert result.claim_agreement[3] < 0.5 * sorted(result.claim_agreement)[3] < min(honest.claim_agreement)
    assert result.alignment[3] > 0  # its histogram matches what it learnt: only its predictions give it away


def test_a_sign_flipped_model_is_screened_for_unlearning_its_claimed_classes(federation):
    start, shards, clients, counts, proxy = federation
    attacked = [_sign_flipped(clients[0], start)] + clients[1:]
    alignment = claim_alignments(predicted_shares(attacked, proxy), predicted_shares([start], proxy)[0], counts)
    assert alignment[0] < 0 < min(alignment[1:])
    # With agreement all but off, unlearning alone flags it.
    assert screen(attacked, proxy, start, counts, ratio=0.01).screened == [0]
    # Without the start model or the histograms the test is off: nan, and agreement alone decides.
    assert all(a != a for a in screen(attacked, proxy, None, counts).alignment)
    assert all(a != a for a in screen(attacked, proxy, start, None).alignment)


def test_fewer_than_half_are_screened_unlearning_first_then_the_least_agreeing(federation):
    start, shards, clients, counts, proxy = federation
    flipped = [_sign_flipped(clients[0], start)] + [_label_flipped(start, *shard) for shard in shards[1:4]]
    attacked = flipped + clients[4:]
    result = screen(attacked, proxy, start, counts, ratio=1.0)
    assert len(result.screened) == 2  # of six models, at most two
    assert result.screened[0] == 0  # the one that unlearnt its classes comes first
    assert screen(clients[:2], proxy, start, counts).screened == []  # two models: neither is the odd one out
    with pytest.raises(ValueError, match="ratio"):
        screen(clients, proxy, start, counts, ratio=0)


def test_the_screen_gives_each_models_predicted_shares_to_the_bit(federation):
    start, _, clients, counts, proxy = federation
    # Fusion's class weights reuse them instead of running every model over the proxy again.
    assert torch.equal(screen(clients, proxy, start, counts).shares, predicted_shares(clients, proxy))
    assert screen(clients[:2], proxy, start, counts).shares is None  # too few to screen: none computed


def test_agreement_is_leave_one_out(federation):
    _, _, clients, _, proxy = federation
    # Identical models agree fully with each other's predictions.
    assert ensemble_agreements(proxy_probabilities([clients[0], copy.deepcopy(clients[0])], proxy)) == [1.0, 1.0]
    # A model is judged by the others' ensemble only: with two copies of B, A's agreement
    # is the share of samples where A predicts B's class, whatever A itself says.
    a, b = clients[0], clients[1]  # shards {0, 1, 2} and {1, 2, 3}
    with torch.no_grad():
        same = (a(proxy).argmax(1) == b(proxy).argmax(1)).double().mean().item()
    assert 0 < same < 1
    assert ensemble_agreements(proxy_probabilities([a, b, copy.deepcopy(b)], proxy))[0] == pytest.approx(same)


def test_an_honest_specialist_is_judged_where_it_claims_to_know(federation):
    start, _, clients, counts, proxy = federation
    # A client that holds one class predicts it everywhere: it agrees with the others on
    # a quarter of the proxy, and plain agreement screens it; where the others see its
    # class it agrees with them, and with its histogram it stays.
    generator = torch.Generator().manual_seed(3)
    x, y = _blobs(200, [3], generator)
    models = clients + [_trained(start, x, y, steps=100)]
    with_counts = torch.cat([counts, torch.bincount(y, minlength=CLASSES).double()[None]])
    judged = screen(models, proxy, start, with_counts)
    assert judged.agreement[6] < 0.5 * sorted(judged.agreement)[3] and judged.claim_agreement[6] > 0.9
    assert judged.screened == []
    assert screen(models, proxy, start, None).screened == [6]
    # Claim agreement weighs each sample by the claimed share of the class the others see.
    probabilities = proxy_probabilities(models, proxy)
    others = (probabilities.sum(0) - probabilities[6]).argmax(1)
    seen_as_three = others == 3
    expected = float((probabilities[6].argmax(1)[seen_as_three] == 3).double().mean())
    assert claim_agreements(probabilities, with_counts)[6] == pytest.approx(expected)


def test_agreement_stands_down_when_the_models_disagree_anyway(federation):
    start, _, _, _, proxy = federation
    # Models that know nothing but their one class agree little with any ensemble.
    # Without histograms the median falls below the floor, and none is screened for
    # disagreeing, though their agreements differ; with them, no model's claimed class
    # is what the others predict often enough to judge it by (nan), and none is either.
    generator = torch.Generator().manual_seed(1)
    shards = [_blobs(200, [c], generator) for c in range(CLASSES)]
    specialists = [_trained(start, x, y, steps=100) for x, y in shards]
    counts = torch.stack([torch.bincount(y, minlength=CLASSES) for _, y in shards]).double()
    blind = screen(specialists, proxy, None, None, ratio=1.0)
    assert sorted(blind.agreement)[1] < MIN_MEDIAN_AGREEMENT and min(blind.agreement) < max(blind.agreement)
    assert blind.screened == []
    result = screen(specialists, proxy, start, counts, ratio=1.0)
    assert all(a != a for a in result.claim_agreement) and min(result.alignment) > 0
    assert result.screened == []
