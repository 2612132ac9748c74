import copy

import pytest
import torch

import models
from strategies.fusion import fuse
from strategies.fusion.chains import conv_norm_chain, fit_chain


@pytest.fixture(scope="module")
def projected_effnet():
    torch.manual_seed(0)
    model = models.project(models.create("efficientnet-lite0", 10)).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model


def test_conv_norm_chains_reproduce_the_efficientnet_blocks(projected_effnet):
    model = projected_effnet
    x = torch.randn(2, 3, 32, 32)
    blocks = [torch.nn.Sequential(model.conv_stem, model.bn1)] + [b for stage in model.blocks for b in stage]
    kinds = set()
    with torch.no_grad():
        for block in blocks:
            chain = conv_norm_chain(block)
            assert chain is not None, type(block).__name__
            kinds.add((len(chain.stages), chain.skip))
            assert (chain(x) - block(x)).abs().max().item() < 1e-4
            x = block(x)
    assert kinds == {(1, False), (2, False), (3, False), (3, True)}  # stem, separable, MBConv with/without skip


def test_a_chain_fit_recovers_a_reachable_block(projected_effnet):
    block = projected_effnet.blocks[1][1]  # MBConv with skip: pointwise frozen, depthwise projected
    teacher = copy.deepcopy(block)
    torch.manual_seed(1)
    with torch.no_grad():
        teacher.conv_dw.gamma.mul_(1 + 0.3 * torch.randn_like(teacher.conv_dw.gamma))
        for norm in (teacher.bn1, teacher.bn2, teacher.bn3):
            norm.weight.mul_(1 + 0.2 * torch.randn_like(norm.weight))
            norm.bias.add_(0.1 * torch.randn_like(norm.bias))
    x = torch.randn(64, block.conv_pw.in_channels, 8, 8)
    with torch.no_grad():
        target = teacher(x)
        before = (block(x) - target).pow(2).mean().item()
        chain, teacher_chain = conv_norm_chain(block), conv_norm_chain(teacher)
        assert fit_chain(chain, x, [teacher_chain], [x], target - x)
        after = (block(x) - target).pow(2).mean().item()
    assert after < 1e-3 * before


def test_fusing_identical_projected_efficientnets_returns_the_same_function(projected_effnet):
    proxy = [torch.randn(32, 3, 32, 32)]
    fused, report = fuse([projected_effnet, copy.deepcopy(projected_effnet)], proxy)
    with torch.no_grad():
        diff = (fused(proxy[0]) - projected_effnet(proxy[0])).abs().max().item()
    assert diff < 1e-3
    assert all(r["fit"].startswith("closed") for r in report["levels"])


def test_a_stem_fit_on_grey_images_keeps_colour_contrast_channels(projected_effnet):
    from strategies.fusion.chains import NEAR_CONSTANT, fit_stage

    stem = copy.deepcopy(conv_norm_chain(torch.nn.Sequential(projected_effnet.conv_stem, projected_effnet.bn1)))
    stage = stem.stages[0]
    with torch.no_grad():  # channel 0 sees red minus green: exactly 0 on grey images
        stage.conv.weight[0, 1] = -stage.conv.weight[0, 0]
        stage.conv.weight[0, 2] = 0
    torch.manual_seed(2)
    grey = torch.rand(64, 1, 32, 32).expand(-1, 3, -1, -1) * 2 - 1
    spread = lambda y: y.transpose(0, 1).flatten(1).std(1)  # noqa: E731

    with torch.no_grad():
        gain_before = stage.norm.weight / (stage.norm.running_var + stage.norm.eps).sqrt()
        current = stage.pre_activation(grey)
        target = current * 1.5 + 0.2  # a reachable change of gain and offset...
        target[:, 0] += 0.05 * torch.randn_like(target[:, 0])  # ...noise only a huge gain could chase
        fit_stage(stage, grey, target)
        fitted = stage.pre_activation(grey)
        gain_after = stage.norm.weight / (stage.norm.running_var + stage.norm.eps).sqrt()
    live = spread(current) >= NEAR_CONSTANT * spread(current).median()
    assert not live[0] and spread(fitted)[0] < 1e-3  # still nearly constant...
    assert (fitted[:, 0].mean() - target[:, 0].mean()).abs() < 1e-3  # ...at the target's mean
    assert gain_after[0].abs() < 2 * gain_before[0].abs() + 1  # and no runaway gain on it
    # The others take their gain (the ridge, shrinking towards the current stage, holds
    # back a few weak channels).
    ratio = spread(fitted) / spread(current)
    others = live.clone()
    others[0] = False
    assert others.sum() > 20 and ratio[others].median() == pytest.approx(1.5, abs=0.01)
    assert ((ratio[others] > 1.1) & (ratio[others] < 1.6)).all()
    assert (fitted[:, others] - target[:, others]).pow(2).mean() < 1e-2 * target[:, others].pow(2).mean()


def test_levels_with_frozen_kernels_are_matched_channel_to_channel(projected_effnet):
    other = copy.deepcopy(projected_effnet)
    torch.manual_seed(3)
    with torch.no_grad():  # another client: its trainable scales moved
        for m in other.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.mul_(1 + 0.3 * torch.randn_like(m.weight))
    _, report = fuse([projected_effnet, other], [torch.randn(32, 3, 32, 32)])
    by_kind = {(r["kind"], r["init"]) for r in report["levels"]}
    # Every block ends in a frozen 1x1 conv: its channel c is one filter in both models.
    assert by_kind == {("stem", "fused"), ("block", "identity"), ("head", "classes")}
    assert all(r["moved"] == 0 for r in report["levels"] if r["init"] == "identity")


def test_fixed_channel_targets_are_the_attribution_weighted_channel_means():
    from strategies.fusion.matching import match_level

    torch.manual_seed(4)
    a, b, fused = torch.randn(8, 3, 2, 2), torch.randn(8, 3, 2, 2), torch.randn(8, 3, 2, 2)
    scores = [torch.tensor([1.0, 3.0, 0.0]), torch.tensor([3.0, 1.0, 0.0])]
    matching = match_level([a, b], scores, fused, fixed_channels=True)
    # Weights are normalised per model to mean 1: model a (1, 3, 0) * 3/4, model b (3, 1, 0) * 3/4.
    assert torch.allclose(matching.targets[:, 0], (a[:, 0] + 3 * b[:, 0]) / 4, atol=1e-6)
    assert torch.allclose(matching.targets[:, 1], (3 * a[:, 1] + b[:, 1]) / 4, atol=1e-6)
    assert torch.equal(matching.targets[:, 2], fused[:, 2])  # no weight anywhere: it keeps its output
    assert matching.moved == 0 and matching.init == "identity"


@pytest.mark.parametrize("multiplier", [1, 2])
def test_on_a_1x1_map_the_depthwise_equations_take_the_kernel_centre_as_the_conv_would(multiplier):
    from timm.layers import Conv2dSame

    from models.projection import ProjectedConv2d
    from strategies.fusion.fitting import _projected_conv_equations

    torch.manual_seed(0)
    conv = ProjectedConv2d(Conv2dSame(6, 6 * multiplier, 5, stride=2, groups=6)).double()
    assert conv.centre == (2, 2)
    x, y = torch.randn(70, 6, 1, 1, dtype=torch.float64), torch.randn(70, 6 * multiplier, 1, 1, dtype=torch.float64)
    through_the_conv = copy.deepcopy(conv)
    through_the_conv.centre = None
    for shortcut, full in zip(_projected_conv_equations(conv, x, y, bias=True),
                              _projected_conv_equations(through_the_conv, x, y, bias=True)):
        assert torch.allclose(shortcut, full, rtol=1e-10, atol=1e-12)
