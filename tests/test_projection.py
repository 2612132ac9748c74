import pytest
import torch
from timm.layers import Conv2dSame
from timm.layers.conv2d_same import conv2d_same
from torch import nn

import models
from models import ProjectedConv2d, fold, parameter_report, project


def _perturbed(model, seed=0, scale=0.05):
    """Trained-looking weights (and BN statistics), not the init ones."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
        for name, buf in model.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 6, 3, padding=1, bias=True),
    nn.Conv2d(4, 6, 3, stride=2, dilation=2, padding=2, bias=False),
    nn.Conv2d(4, 6, 3, groups=2, padding=1),
    nn.Conv2d(6, 6, 5, groups=6, padding=2),  # depthwise
    nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
    Conv2dSame(4, 6, 3, stride=2),  # timm's TF-'same' padding
], ids=["bias", "stride-dilation", "grouped", "depthwise", "reflect", "same"])
def test_projected_conv_equals_the_conv_then_learns_per_channel_pair(conv):
    x = torch.randn(2, 4 if conv.in_channels == 4 else 6, 11, 11)
    projected = ProjectedConv2d(conv)
    assert projected.gamma.shape == (conv.out_channels, conv.in_channels // conv.groups)
    assert "weight" in dict(projected.named_buffers()) and "weight" not in dict(projected.named_parameters())
    assert torch.allclose(projected(x), conv(x), atol=1e-6)
    with torch.no_grad():
        projected.gamma.uniform_(0.5, 1.5)
    expected = conv._conv_forward(x, conv.weight * projected.gamma[:, :, None, None], conv.bias) \
        if not isinstance(conv, Conv2dSame) else None
    if expected is not None:
        assert torch.allclose(projected(x), expected, atol=1e-5)
    folded = projected.fold()
    assert type(folded) is type(conv)
    assert torch.allclose(folded(x), projected(x), atol=1e-5)


@pytest.mark.parametrize("conv", [
    nn.Conv2d(6, 6, 5, groups=6, padding=2, bias=False),
    nn.Conv2d(6, 12, 3, groups=6, padding=1),  # depth multiplier 2
    Conv2dSame(6, 6, 5, stride=2, groups=6, bias=False),
], ids=["depthwise", "multiplier", "same-stride"])
@pytest.mark.parametrize("side", [1, 2, 9])
def test_depthwise_scaling_after_the_conv_matches_the_scaled_kernel_in_values_and_gradients(conv, side):
    projected = ProjectedConv2d(conv)
    assert projected.scales_output and not ProjectedConv2d(nn.Conv2d(4, 6, 3, groups=2)).scales_output
    # On a 1x1 map a 'same'-padded one reads only its kernel's centre; other paddings run the conv.
    assert projected.centre == (conv.kernel_size[0] // 2,) * 2
    assert ProjectedConv2d(nn.Conv2d(6, 6, 5, groups=6, padding=1)).centre is None
    assert ProjectedConv2d(nn.Conv2d(6, 6, 3, groups=6, padding=1, padding_mode="reflect")).centre is None
    with torch.no_grad():
        projected.gamma.uniform_(0.5, 1.5)
    x = torch.randn(3, 6, side, side, requires_grad=True)
    out = projected(x)
    gamma = projected.gamma.detach().clone().requires_grad_(True)
    scaled = projected.weight * gamma[:, :, None, None]
    same = conv2d_same if projected.same_padding else nn.functional.conv2d
    reference = same(x, scaled, projected.bias, projected.stride, projected.padding, projected.dilation, conv.groups)
    assert torch.allclose(out, reference, atol=1e-6)
    upstream = torch.randn_like(out)
    grad_x, grad_gamma = torch.autograd.grad(out, (x, projected.gamma), upstream)
    ref_x, ref_gamma = torch.autograd.grad(reference, (x, gamma), upstream)
    assert torch.allclose(grad_x, ref_x, atol=1e-5) and torch.allclose(grad_gamma, ref_gamma, atol=1e-5)


@pytest.mark.parametrize("name,options", [
    ("efficientnet-lite0", {"pretrained": True}),
    ("timm:resnet18", {"pretrained": False}),
    ("simple-cnn", {}),
])
def test_projected_net_matches_pretrained_at_init_and_folds_back_after_training(name, options):
    size = 28 if name == "simple-cnn" else 64
    channels = 1 if name == "simple-cnn" else 3
    model = _perturbed(models.create(name, 10, **options)) if name != "efficientnet-lite0" \
        else models.create(name, 10, **options).eval()
    x = torch.randn(4, channels, size, size)
    projected = project(model, pointwise="project").eval()
    with torch.no_grad():
        assert (projected(x) - model(x)).abs().max().item() < 1e-4
        for module in projected.modules():
            if isinstance(module, ProjectedConv2d):
                module.gamma.uniform_(0.8, 1.2)  # as if trained
        assert (projected(x) - model(x)).abs().max().item() > 1e-3
        assert (fold(projected)(x) - projected(x)).abs().max().item() < 1e-4
    assert not models.is_projected(fold(projected))


def test_gradients_reach_only_gamma_norms_and_head_and_frozen_kernels_stay_bit_identical():
    model = project(models.create("efficientnet-lite0", 10), pointwise="freeze").train()
    before = {n: b.clone() for n, b in model.named_buffers() if n.endswith("weight")}
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.1, momentum=0.9, weight_decay=1e-4)
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    for _ in range(2):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    for name, p in model.named_parameters():
        kind = name.rsplit(".", 1)[-1]
        if p.requires_grad:
            assert kind in ("gamma", "weight", "bias"), name
            if kind in ("weight", "bias"):  # only norm layers and the head keep weights trainable
                module = model.get_submodule(name.rsplit(".", 1)[0])
                assert isinstance(module, (nn.BatchNorm2d, nn.Linear)), name
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
            assert torch.equal(p, frozen[name]), name
    for name, buf in before.items():
        assert torch.equal(dict(model.named_buffers())[name], buf), name


def test_pointwise_policy_decides_what_1x1_convs_do():
    base = models.create("efficientnet-lite0", 10)
    counts = {p: parameter_report(project(base, pointwise=p)) for p in models.POINTWISE_POLICIES}
    full = parameter_report(base)
    assert all(r["total"] == full["total"] for r in counts.values())
    assert counts["freeze"]["trainable"] < 0.05 * full["trainable"]
    # 1x1 convs: gamma has as many entries as W, so project and train cost the same.
    assert counts["project"]["trainable"] == counts["train"]["trainable"] > 0.9 * full["trainable"]
    assert counts["freeze"]["by_type"]["pointwise conv"]["trainable"] == 0
    assert "projected pointwise conv" in counts["project"]["by_type"]


def test_update_bytes_are_the_exchanged_tensors():
    model = project(models.create("timm:resnet18", 10, pretrained=False), pointwise="freeze")
    state = models.exchanged_state(model)
    report = parameter_report(model)
    assert report["bytes_per_update"] == models.state_bytes(state)
    assert report["bytes_per_update"] < 0.15 * parameter_report(models.create("timm:resnet18", 10, pretrained=False))["bytes_per_update"]
    assert all(not n.endswith("conv1.weight") for n in state)  # frozen kernels never travel


def test_efficientnet_lite0_weights_are_imagenet_trained():
    """scikit-image's chelsea photo is a cat (ImageNet classes 281-285)."""
    from skimage import data as skimage_data

    model = models.create("efficientnet-lite0", 1000).eval()
    image = torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1).float().div(255)[None]
    image = nn.functional.interpolate(image, size=(224, 224), mode="bilinear", antialias=True)
    with torch.no_grad():
        probs = model((image - 0.5) / 0.5).softmax(1)[0]
    assert 281 <= int(probs.argmax()) <= 285
    assert probs[281:286].sum() > 0.5
    # A fresh head for the task keeps the backbone's weights.
    assert torch.equal(models.create("efficientnet-lite0", 10).conv_stem.weight, model.conv_stem.weight)


def test_timm_model_loads_a_local_checkpoint(tmp_path):
    source = models.create("timm:resnet18", 10, pretrained=False)
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    loaded = models.create("timm:resnet18", 10, weights=str(tmp_path / "resnet18.pth"))
    assert torch.equal(loaded.conv1.weight, source.conv1.weight)
    with pytest.raises(FileNotFoundError):
        models.create("timm:resnet18", 10, weights=str(tmp_path / "missing.pth"))
    with pytest.raises(models.ModelError, match="unknown timm model"):
        models.info("timm:not-a-net")
