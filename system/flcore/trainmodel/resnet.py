"""CIFAR-style ResNets (3x3 stem, no max-pool) with one BasicBlock per stage: resnet4/6/8/10."""
from torch import nn

from .layers import conv_bn_relu, to_feature_dim
from .registry import register_model

STAGE_WIDTHS = (64, 128, 256, 512)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut (1x1 conv-BN when the shape changes)."""

    def __init__(self, in_width: int, out_width: int, stride: int):
        super().__init__()
        self.residual = nn.Sequential(
            conv_bn_relu(in_width, out_width, stride=stride),
            nn.Conv2d(out_width, out_width, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_width),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or in_width != out_width:
            self.shortcut = nn.Sequential(nn.Conv2d(in_width, out_width, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_width))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.residual(x) + self.shortcut(x))


def cifar_resnet(widths: tuple[int, ...], in_channels: int, feature_dim: int) -> nn.Sequential:
    """Stem at widths[0], then one BasicBlock per width; every stage after the first halves the resolution."""
    layers = [conv_bn_relu(in_channels, widths[0])]
    previous_width = widths[0]
    for index, width in enumerate(widths):
        layers.append(BasicBlock(previous_width, width, stride=1 if index == 0 else 2))
        previous_width = width
    layers += [nn.AdaptiveAvgPool2d(1), to_feature_dim(widths[-1], feature_dim)]
    return nn.Sequential(*layers)


def _register_depth(num_stages: int) -> None:
    depth = 2 + 2 * num_stages  # stem conv + two convs per block + head

    @register_model(f"resnet{depth}")
    def build(feature_dim: int, in_channels: int, image_size: int) -> nn.Module:
        return cifar_resnet(STAGE_WIDTHS[:num_stages], in_channels, feature_dim)


for _num_stages in range(1, len(STAGE_WIDTHS) + 1):
    _register_depth(_num_stages)
