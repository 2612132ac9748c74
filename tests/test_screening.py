"""Fusion's screen of well-formed but hostile models, on tiny real networks."""

import copy

import pytest
import torch
from torch import nn

from strategies.fusion.screening import ensemble_agreements, screen, update_cosines

CLASSES = 4


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, CLASSES))


def _moved(model: nn.Module, update: list[torch.Tensor], sign: float = 1.0) -> nn.Module:
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p, u in zip(moved.parameters(), update):
            p.add_(sign * u)
    return moved


@pytest.fixture()
def federation():
    """A start model and six honest clients: a shared update plus a small private one each."""
    torch.manual_seed(0)
    start = _net()
    shared = [0.05 * torch.randn_like(p) for p in start.parameters()]
    clients = [_moved(start, [s + 0.01 * torch.randn_like(s) for s in shared]) for _ in range(6)]
    return start, shared, clients, torch.randn(400, 12)


def _flipped_labels(model: nn.Module) -> nn.Module:
    """The same model with its class outputs reversed: class c is answered as C - 1 - c."""
    flipped = copy.deepcopy(model)
    with torch.no_grad():
        flipped[2].weight.copy_(model[2].weight.flip(0))
        flipped[2].bias.copy_(model[2].bias.flip(0))
    return flipped


def test_honest_clients_pass_and_a_label_flipped_model_is_screened(federation):
    start, _, clients, proxy = federation
    honest = screen(clients, proxy, start)
    assert honest.screened == [] and min(honest.agreement) > 0.9 and min(honest.cosine) > 0.5
    attacked = clients[:3] + [_flipped_labels(clients[3])] + clients[4:]
    result = screen(attacked, proxy, start)
    assert result.screened == [3]
    assert result.agreement[3] < 0.5 * sorted(result.agreement)[3]
    assert result.cosine[3] > 0  # its weights moved as the others': only its predictions give it away


def test_a_sign_flipped_update_is_screened_by_its_direction(federation):
    start, shared, clients, proxy = federation
    flipped = _moved(start, [p0 - p1 for p0, p1 in zip(start.parameters(), clients[0].parameters())])
    attacked = [flipped] + clients[1:]
    result = screen(attacked, proxy, start)
    assert result.screened == [0] and result.cosine[0] < -0.9
    assert min(result.cosine[1:]) > 0.5
    # Without the model the clients trained from, the direction is unknown: only agreement counts.
    assert all(c != c for c in screen(attacked, proxy, None).cosine)  # nan


def test_fewer_than_half_are_screened_the_least_agreeing_first(federation):
    start, _, clients, proxy = federation
    # Four of six models disagree with the rest; at most two (fewer than half) are screened.
    attacked = [_flipped_labels(m) for m in clients[:4]] + clients[4:]
    result = screen(attacked, proxy, start, ratio=1.0)
    assert len(result.screened) == 2
    assert [result.agreement[i] for i in result.screened] == sorted(result.agreement)[:2]
    assert screen(clients[:2], proxy, start).screened == []  # two models: neither is the odd one out
    with pytest.raises(ValueError, match="ratio"):
        screen(clients, proxy, start, ratio=0)


def test_agreement_and_cosine_are_leave_one_out_and_scale_free(federation):
    start, shared, clients, proxy = federation
    # Agreement of one model with the other's predictions: identical models agree fully.
    assert ensemble_agreements([clients[0], copy.deepcopy(clients[0])], proxy) == [1.0, 1.0]
    # A model whose update is twice another's has the same cosine.
    doubled = _moved(start, [2 * (p1 - p0) for p0, p1 in zip(start.parameters(), clients[0].parameters())])
    cosines = update_cosines([clients[0], doubled] + clients[1:], start)
    assert cosines[0] == pytest.approx(cosines[1], rel=1e-6)
