import pytest
import torch
import torchvision
from torch import nn

import models
from models import levels


def _run(level_list, x):
    for level in level_list:
        x = level(x)
        assert x.shape[1] == level.width, level.name
    return x


@pytest.mark.parametrize("build,shape,count", [
    (lambda: models.create("simple-cnn", 10), (3, 1, 28, 28), 5),
    (lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.ReLU(), nn.Dropout(0.1), nn.Linear(7, 3)), (3, 12), 2),
    (lambda: models.create("efficientnet-lite0", 10), (2, 3, 64, 64), 19),
    (lambda: models.project(models.create("efficientnet-lite0", 10)), (2, 3, 64, 64), 19),
    (lambda: models.create("timm:resnet18", 10, pretrained=False), (2, 3, 64, 64), 10),
    (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 64, 64), 10),
], ids=["simple-cnn", "mlp", "efficientnet-lite0", "projected-efficientnet-lite0", "timm-resnet18", "torchvision-resnet18"])
def test_running_the_levels_in_order_reproduces_the_model(build, shape, count):
    model = build().eval()
    level_list = levels(model)
    x = torch.randn(*shape)
    with torch.no_grad():
        assert torch.equal(_run(level_list, x), model(x))
    assert len(level_list) == count
    assert [l.kind for l in level_list][-1] == "head" and level_list[-1].width == model(x).shape[1]


def test_levels_share_modules_with_the_model():
    model = models.create("simple-cnn", 10).eval()
    first = levels(model)[0]
    with torch.no_grad():
        first.module[0].weight.zero_()
    assert model[0].weight.abs().sum() == 0


def test_unsupported_model_is_named():
    class Odd(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(ValueError, match="no level decomposition for Odd"):
        levels(Odd())
